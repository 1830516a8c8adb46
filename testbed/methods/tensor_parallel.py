"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019): heads and MLP columns split over N ranks.

Per block, each rank computes q/k/v for its H/N heads and the matching columns of the output
projection, then one all-reduce of the partial [B, T, D] sums (param ``all_reduce``: ring, direct, or
auto: direct unless the experiment says the ranks' paths share links and the tensor is large); likewise the MLP's fc1 rows
(hidden units) and fc2 columns, then a second all-reduce. Biases that follow a reduction are
added once, after it. Embeddings, LayerNorms and the head are replicated; every rank ends with
the full output and rank 0 returns it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from testbed.methods.base import (FP32_BYTES, CommSchedule, Method, all_reduce_algorithm, check_all_reduce_param,
                                  check_divides_heads, global_mask, reduces, stack)
from testbed.models.layers import attend


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


class TensorParallel(Method):
    name = "tensor_parallel"
    DEFAULTS: dict[str, Any] = {"all_reduce": "auto"}

    def __init__(self, model, params, rank, world_size, comm, tokens, codebook_path=None):
        super().__init__(model, params, rank, world_size, comm, tokens, codebook_path)
        with torch.no_grad():
            self.shards = [_Shard(b, rank, world_size) for b in model.blocks]

    def _forward(self, inp: torch.Tensor) -> torch.Tensor | None:
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

    @classmethod
    def _check_params(cls, p, cfg) -> None:
        check_all_reduce_param(p)

    @classmethod
    def settle(cls, params, cfg, tokens, world_size, batch=1, flat=True) -> dict[str, Any]:
        p = dict(params)
        p["all_reduce"] = all_reduce_algorithm(p.get("all_reduce", "auto"), batch * tokens * cfg.dim * FP32_BYTES,
                                               world_size, flat)
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
