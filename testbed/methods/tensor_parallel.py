"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019): heads and MLP columns split over N ranks.

Per block, each rank computes q/k/v for its H/N heads and the matching columns of the output
projection, then one all-reduce of the partial [B, T, D] sums (param ``all_reduce``: ring, direct, or
auto: direct unless the experiment says the ranks' paths share links and the tensor is large); likewise the MLP's fc1 rows
(hidden units) and fc2 columns, then a second all-reduce. Biases that follow a reduction are
added once, after it. Embeddings, LayerNorms and the head are replicated; every rank ends with
the full output and rank 0 returns it. Llama-family blocks (no biases after a reduction, GQA,
rotary q/k, SwiGLU) are sharded the same way by ``_LlamaShard``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from testbed.methods.base import (FP32_BYTES, CommSchedule, Method, all_reduce_algorithm, check_all_reduce_param,
                                  check_divides_heads, global_mask, reduces, stack)
from testbed.models.layers import attend
from testbed.models.llama import gqa_attend


class _Shard:
    """One block's weights for one rank: q/k/v rows and o columns of its heads, fc1 rows and fc2
    columns of its hidden units (copies, so a rank holds only its share)."""

    def __init__(self, block, rank: int, world_size: int):
        D, mlp = block.attn.q.weight.shape[0], block.mlp.fc1.weight.shape[0]
        cols = slice(rank * D // world_size, (rank + 1) * D // world_size)  # its heads' q/k/v output dims
        hid = torch.tensor_split(torch.arange(mlp), world_size)[rank]  # its MLP hidden units
        a, m = block.attn, block.mlp
        self.ln1, self.ln2, self.act, self.head_dim = block.ln1, block.ln2, m.act, a.head_dim
        self.wq, self.bq = a.q.weight[cols].clone(), a.q.bias[cols].clone()
        self.wk, self.bk = a.k.weight[cols].clone(), a.k.bias[cols].clone()
        self.wv, self.bv = a.v.weight[cols].clone(), a.v.bias[cols].clone()
        self.wo, self.bo = a.o.weight[:, cols].clone(), a.o.bias.detach().clone()
        self.w1, self.b1 = m.fc1.weight[hid].clone(), m.fc1.bias[hid].clone()
        self.w2, self.b2 = m.fc2.weight[:, hid].clone(), m.fc2.bias.detach().clone()
        self.kv_index = torch.arange(cols.stop // self.head_dim - cols.start // self.head_dim)  # one KV head per head

    def attn_partial(self, h, mask, pos, cache=None, append: bool = False) -> torch.Tensor:
        """As _LlamaShard.attn_partial (no rotation here); bo is added after the reduction."""
        q, k, v = F.linear(h, self.wq, self.bq), F.linear(h, self.wk, self.bk), F.linear(h, self.wv, self.bv)
        if append:
            cache[0], cache[1] = torch.cat([cache[0], k], 1), torch.cat([cache[1], v], 1)
            k, v = cache
        elif cache is not None:
            cache.append([k, v])
        return F.linear(attend(q, k, v, self.head_dim, mask), self.wo)

    def mlp_partial(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act(F.linear(h, self.w1, self.b1)), self.w2)


class _LlamaShard:
    """One Llama block's weights for one rank: q rows of its H/N query heads and the o columns of
    them; K/V rows of the KV heads those queries read (GQA). When N divides n_kv_heads that is the
    rank's own KV/N heads (split); otherwise every rank holds the KV heads of its query heads (some
    held by several ranks: replicated). Either way the all-reduces are the same [B, T, D] sums:
    which KV heads a rank holds changes its compute and its KV cache, not its communication.
    SwiGLU: gate and up rows and down columns of its hidden units."""

    def __init__(self, block, rank: int, world_size: int, cfg):
        H, hd, g = cfg.n_heads, cfg.head_dim, cfg.n_heads // cfg.kv_heads
        qa, qb = rank * H // world_size, (rank + 1) * H // world_size  # its query heads
        ka, kb = qa // g, (qb - 1) // g + 1  # the KV heads they read
        hid = torch.tensor_split(torch.arange(cfg.mlp_dim), world_size)[rank]
        a, m = block.attn, block.mlp
        q_rows, kv_rows = slice(qa * hd, qb * hd), slice(ka * hd, kb * hd)
        bias = (lambda lin, rows: None if lin.bias is None else lin.bias[rows].clone())
        self.ln1, self.ln2, self.head_dim, self.rotate = block.ln1, block.ln2, hd, a.rotate
        self.kv_index = torch.arange(qa, qb) // g - ka  # local query head -> local KV head
        self.kv_heads = (ka, kb)
        self.wq, self.bq = a.q.weight[q_rows].clone(), bias(a.q, q_rows)
        self.wk, self.bk = a.k.weight[kv_rows].clone(), bias(a.k, kv_rows)
        self.wv, self.bv = a.v.weight[kv_rows].clone(), bias(a.v, kv_rows)
        self.wo = a.o.weight[:, q_rows].clone()
        self.wg, self.wu, self.wd = m.gate.weight[hid].clone(), m.up.weight[hid].clone(), m.down.weight[:, hid].clone()
        self.bo = self.b2 = 0.0  # no biases after the reductions

    def attn_partial(self, h: torch.Tensor, mask, pos: torch.Tensor, cache=None, append: bool = False) -> torch.Tensor:
        """``cache``: a list that prefill appends [k, v] to, or (``append``) this block's [k, v] that
        the new tokens' K/V join before they attend over it."""
        q = self.rotate(F.linear(h, self.wq, self.bq), pos)  # (B, T, H/N * hd)
        k = self.rotate(F.linear(h, self.wk, self.bk), pos)  # (B, T, its KV heads * hd)
        v = F.linear(h, self.wv, self.bv)
        if append:
            cache[0], cache[1] = torch.cat([cache[0], k], 1), torch.cat([cache[1], v], 1)
            k, v = cache
        elif cache is not None:
            cache.append([k, v])
        y = gqa_attend(q, k, v, self.head_dim, self.kv_index, mask)
        return F.linear(y, self.wo)  # (B, T, D): this rank's partial sum

    def mlp_partial(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(h, self.wg)) * F.linear(h, self.wu), self.wd)


class TensorParallel(Method):
    name = "tensor_parallel"
    DEFAULTS: dict[str, Any] = {"all_reduce": "auto"}

    def __init__(self, model, params, rank, world_size, comm, tokens, codebook_path=None):
        super().__init__(model, params, rank, world_size, comm, tokens, codebook_path)
        with torch.no_grad():
            if self.cfg.kind == "llama":
                self.shards = [_LlamaShard(b, rank, world_size, self.cfg) for b in model.blocks]
            else:
                self.shards = [_Shard(b, rank, world_size) for b in model.blocks]

    def _forward(self, inp: torch.Tensor) -> torch.Tensor | None:
        if self.cfg.kind == "llama" or self._keep_cache:
            return self._forward_shards(inp)
        x = self.model.embed(inp)  # (B, T, D), replicated
        B, T = x.shape[:2]
        mask = global_mask(self.model, 0, T, T)
        algo = self.algorithm(self.cfg, T, self.world_size, self.params, B)
        for s in self.shards:
            h = s.ln1(x)
            y = attend(F.linear(h, s.wq, s.bq), F.linear(h, s.wk, s.bk), F.linear(h, s.wv, s.bv), s.head_dim, mask)
            x = x + self.comm.all_reduce(F.linear(y, s.wo), algo) + s.bo  # (B, T, D) partial sums over heads
            u = s.act(F.linear(s.ln2(x), s.w1, s.b1))  # (B, T, mlp/N)
            x = x + self.comm.all_reduce(F.linear(u, s.w2), algo) + s.b2
        return self.model.output(x[:, self.model.output_index(T)]) if self.rank == self.output_rank else None

    def _forward_shards(self, inp: torch.Tensor) -> torch.Tensor | None:
        """The same sums through the shards' attn_partial/mlp_partial (any model; keeps the cache)."""
        x = self.model.embed(inp)  # (B, T, D), replicated
        B, T = x.shape[:2]
        mask, pos = global_mask(self.model, 0, T, T), torch.arange(T)
        algo = self.algorithm(self.cfg, T, self.world_size, self.params, B)
        cache = [] if self._keep_cache else None
        for s in self.shards:
            x = x + self.comm.all_reduce(s.attn_partial(s.ln1(x), mask, pos, cache), algo) + s.bo
            x = x + self.comm.all_reduce(s.mlp_partial(s.ln2(x)), algo) + s.b2
        return self._logits(x, cache)

    def _logits(self, x: torch.Tensor, cache) -> torch.Tensor | None:
        """The last token's logits on output_rank; when decoding follows, on every rank (each needs
        the next token id, and the head is replicated) with its KV-head cache kept."""
        if cache is not None:
            self._cache = cache
            self._all_logits = self.model.output(x[:, -1])
        return self.model.output(x[:, -1]) if self.rank == self.output_rank else None

    def _decode_step(self, ids, pos):
        """Every rank: its KV heads' cache grows by one token; two all-reduces of [B, 1, D] per block."""
        x = self.model.embed_positions(ids, pos)  # (B, 1, D)
        p = torch.tensor([pos])
        algo = self.algorithm(self.cfg, 1, self.world_size, self.params, x.shape[0])
        for s, c in zip(self.shards, self._cache):
            x = x + self.comm.all_reduce(s.attn_partial(s.ln1(x), None, p, c, append=True), algo) + s.bo
            x = x + self.comm.all_reduce(s.mlp_partial(s.ln2(x)), algo) + s.b2
        return self.model.output(x[:, -1])

    @classmethod
    def _decode_calls(cls, cfg, N, p, batch):
        reduce = reduces(batch * cfg.dim, FP32_BYTES, N, cls.algorithm(cfg, 1, N, p, batch))  # [B, 1, D] sums
        return [] if reduce is None else [reduce] * (2 * cfg.n_layers)

    @classmethod
    def _check_params(cls, p, cfg) -> None:
        check_all_reduce_param(p)

    @classmethod
    def settle(cls, params, cfg, tokens, world_size, batch=1, flat=True, delay_ms=None) -> dict[str, Any]:
        p = dict(params)
        p["all_reduce"] = all_reduce_algorithm(p.get("all_reduce", "auto"), batch * tokens * cfg.dim * FP32_BYTES,
                                               world_size, flat, delay_ms)
        return p

    @staticmethod
    def algorithm(cfg, T: int, N: int, p: dict[str, Any], batch: int) -> str:
        """The all-reduce algorithm that runs: the param, or auto's choice for the [B, T, D] fp32 sums."""
        return all_reduce_algorithm(p["all_reduce"], batch * T * cfg.dim * FP32_BYTES, N)

    @classmethod
    def _schedule(cls, cfg, T, N, p, batch) -> CommSchedule:
        check_divides_heads(cfg, N)
        reduce = reduces(batch * T * cfg.dim, FP32_BYTES, N, cls.algorithm(cfg, T, N, p, batch))  # [B, T, D] fp32
        calls = [] if reduce is None else [reduce] * (2 * cfg.n_layers)  # attention, then MLP, per block
        return CommSchedule(cls.name, p, stack(calls, N), [T] * N, [T] * N, 0)

    def _summarize(self, sent: list[int]) -> dict[str, Any]:
        blocks = [a + b for a, b in zip(sent[::2], sent[1::2])] or [0] * self.cfg.n_layers
        return {"per_block": blocks, "total": sum(blocks)}
