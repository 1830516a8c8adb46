"""Block parallelism with all-gather (DeTransformer BP+AG, Wei et al. 2024), built from slices of
the original weights.

Why this cannot equal ``single`` exactly: DeTransformer decouples each group of N_b blocks into N
narrow sub-blocks that exchange nothing inside the group. Attention and the MLP mix every feature
of a token, so the D-wide original cannot be computed without communication inside a block
(Megatron needs two all-reduces per block for exactly that). DeTransformer therefore changes the
architecture and fine-tunes it; we have no fine-tuned weights, so we run the decoupled model
made from slices of the original weights, which keeps the communication pattern and compute cost
of BP+AG exactly and its outputs only approximately. We found no exact formulation that keeps
"no communication inside a group".

The decoupled model for N ranks and groups of ``n_b`` consecutive blocks (the last group may be
shorter). Rank r owns features S_r = [r*D/N, (r+1)*D/N), heads H_r (the same index range of the
q/k/v outputs), MLP hidden units M_r (contiguous, torch.tensor_split sizes):
- the first block of a group reads the full all-gathered D-wide x: LN1 over D, q/k/v of heads H_r
  from all D features; every later block in the group reads only the rank's [B, T, D/N] slice:
  LN1 over D/N (LN weights sliced to S_r) and q/k/v weights W[H_r, S_r];
- the output projection keeps W_o[S_r, H_r], so the residual stream stays D/N wide;
- LN2 over D/N, fc1 W[M_r, S_r], fc2 W[S_r, M_r];
- after each group the [B, T, D/N] slices are all-gathered into x [B, T, D]: one round.
All T tokens stay on every rank. N = 1 is exactly the original model. ``decoupled_reference``
computes the same decoupled model on one device in a different way (full-width weights masked to
block-diagonal, grouped LayerNorm) so the sharded code is tested against an independent
formulation; agreement with ``single`` is reported by `testbed compare`, not asserted.
Llama-family blocks are sliced the same way (RMSNorm over D/N, each rank's KV heads: N must
divide n_kv_heads, rotary q/k, SwiGLU), see _NarrowLlamaBlock.
Param ``n_b`` (blocks per group) defaults to 1: the decoupled model closest to the original, and
the most communication (one all-gather per block) of the BP+AG family.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from testbed.errors import check
from testbed.methods.base import (FP32_BYTES, CommSchedule, Method, check_divides_heads, gathers, global_mask,
                                  n_tokens, stack)
from testbed.models.layers import attend
from testbed.models.llama import gqa_attend


def group_starts(n_layers: int, n_b: int) -> list[int]:
    """Index of the first block of each group of n_b blocks."""
    return list(range(0, n_layers, n_b))


def feature_slice(dim: int, world_size: int, rank: int) -> slice:
    """The features S_r (and heads H_r, as q/k/v output dims) that rank r owns."""
    return slice(rank * dim // world_size, (rank + 1) * dim // world_size)


class _NarrowBlock:
    """Rank r's slice of one block of the decoupled model."""

    def __init__(self, block, rank: int, world_size: int, first: bool):
        D, mlp = block.attn.q.weight.shape[0], block.mlp.fc1.weight.shape[0]
        S = feature_slice(D, world_size, rank)
        M = torch.tensor_split(torch.arange(mlp), world_size)[rank]
        inp = slice(None) if first else S  # the first block of a group reads all D features
        a, m = block.attn, block.mlp
        self.first, self.S, self.head_dim, self.act, self.eps = first, S, a.head_dim, m.act, block.ln1.eps
        self.ln1 = (block.ln1.weight[inp].clone(), block.ln1.bias[inp].clone())
        self.ln2 = (block.ln2.weight[S].clone(), block.ln2.bias[S].clone())
        self.q = (a.q.weight[S, inp].clone(), a.q.bias[S].clone())
        self.k = (a.k.weight[S, inp].clone(), a.k.bias[S].clone())
        self.v = (a.v.weight[S, inp].clone(), a.v.bias[S].clone())
        self.o = (a.o.weight[S, S].clone(), a.o.bias[S].clone())
        self.fc1 = (m.fc1.weight[M][:, S].clone(), m.fc1.bias[M].clone())
        self.fc2 = (m.fc2.weight[S][:, M].clone(), m.fc2.bias[S].clone())

    def __call__(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: [B, T, D] for the first block of a group, else [B, T, D/N] -> [B, T, D/N]."""
        h = F.layer_norm(x, (x.shape[-1],), *self.ln1, self.eps)
        y = attend(F.linear(h, *self.q), F.linear(h, *self.k), F.linear(h, *self.v), self.head_dim, mask)
        x = (x[..., self.S] if self.first else x) + F.linear(y, *self.o)
        u = F.layer_norm(x, (x.shape[-1],), *self.ln2, self.eps)
        return x + F.linear(self.act(F.linear(u, *self.fc1)), *self.fc2)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), w, eps)


class _NarrowLlamaBlock:
    """Rank r's slice of one Llama block of the decoupled model: as _NarrowBlock, with RMSNorm over
    its features, its KV heads (N divides n_kv_heads: the KV heads its query heads read), rotary
    q/k and SwiGLU (gate, up rows M_r; down [S_r, M_r])."""

    def __init__(self, block, rank: int, world_size: int, first: bool, cfg):
        S = feature_slice(cfg.dim, world_size, rank)
        KV = feature_slice(cfg.kv_dim, world_size, rank)
        M = torch.tensor_split(torch.arange(cfg.mlp_dim), world_size)[rank]
        inp = slice(None) if first else S
        a, m = block.attn, block.mlp
        self.first, self.S, self.head_dim, self.eps, self.rotate = first, S, a.head_dim, cfg.ln_eps, a.rotate
        g = cfg.n_heads // cfg.kv_heads
        self.kv_index = torch.arange(cfg.n_heads // world_size) // g
        self.ln1, self.ln2 = block.ln1.weight[inp].clone(), block.ln2.weight[S].clone()
        bias = (lambda lin, rows: None if lin.bias is None else lin.bias[rows].clone())
        self.q = (a.q.weight[S, inp].clone(), bias(a.q, S))
        self.k = (a.k.weight[KV, inp].clone(), bias(a.k, KV))
        self.v = (a.v.weight[KV, inp].clone(), bias(a.v, KV))
        self.o = a.o.weight[S, S].clone()
        self.gate, self.up = m.gate.weight[M][:, S].clone(), m.up.weight[M][:, S].clone()
        self.down = m.down.weight[S][:, M].clone()

    def __call__(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        pos = torch.arange(x.shape[1])
        h = _rms(x, self.ln1, self.eps)
        q, k = self.rotate(F.linear(h, *self.q), pos), self.rotate(F.linear(h, *self.k), pos)
        y = gqa_attend(q, k, F.linear(h, *self.v), self.head_dim, self.kv_index, mask)
        x = (x[..., self.S] if self.first else x) + F.linear(y, self.o)
        u = _rms(x, self.ln2, self.eps)
        return x + F.linear(F.silu(F.linear(u, self.gate)) * F.linear(u, self.up), self.down)


class BlockParallel(Method):
    name = "block_parallel"
    DEFAULTS: dict[str, Any] = {"n_b": 1}

    def __init__(self, model, params, rank, world_size, comm, tokens, codebook_path=None):
        super().__init__(model, params, rank, world_size, comm, tokens, codebook_path)
        starts = set(group_starts(self.cfg.n_layers, self.params["n_b"]))
        with torch.no_grad():
            if self.cfg.kind == "llama":
                self.blocks = [_NarrowLlamaBlock(b, rank, world_size, i in starts, self.cfg)
                               for i, b in enumerate(model.blocks)]
            else:
                self.blocks = [_NarrowBlock(b, rank, world_size, i in starts) for i, b in enumerate(model.blocks)]

    def _forward(self, inp: torch.Tensor) -> torch.Tensor | None:
        x = self.model.embed(inp)  # (B, T, D), every rank holds all tokens
        T = n_tokens(self.model, inp)
        mask = global_mask(self.model, 0, T, T)
        n_b = self.params["n_b"]
        for g in group_starts(len(self.blocks), n_b):
            for blk in self.blocks[g:g + n_b]:
                x = blk(x, mask)  # (B, T, D/N) after the group's first block
            x = torch.cat(self.comm.all_gather(x.contiguous()), dim=-1)  # (B, T, D)
        if self.rank != self.output_rank:
            return None
        return self.model.output(x[:, self.model.output_index(T)])

    @classmethod
    def _check_params(cls, p, cfg) -> None:
        n_b, L = p["n_b"], None if cfg is None else cfg.n_layers
        check(isinstance(n_b, int) and not isinstance(n_b, bool) and n_b >= 1 and (L is None or n_b <= L), "n_b",
              n_b, f"an integer number of blocks per group in 1..{L or 'L'} (the model's blocks)")

    @classmethod
    def _schedule(cls, cfg, T, N, p, batch) -> CommSchedule:
        check_divides_heads(cfg, N)
        check(cfg.kv_heads % N == 0, "world_size", N,
              f"a divisor of the model's KV head count n_kv_heads={cfg.kv_heads} (block_parallel splits KV heads)")
        width = [len(range(cfg.dim)[feature_slice(cfg.dim, N, r)]) for r in range(N)]
        gather = gathers([batch * T * w * FP32_BYTES for w in width])  # the [B, T, D/N] fp32 slices
        rounds = len(group_starts(cfg.n_layers, p["n_b"]))  # one per group, per_block has one entry per round
        return CommSchedule(cls.name, p, stack([gather] * rounds, N), [T] * N, [T] * N, 0)


def _grouped_ln(x: torch.Tensor, ln, N: int) -> torch.Tensor:
    """LayerNorm applied separately to each of N feature slices, with the full LN's affine params."""
    B, T, D = x.shape
    y = F.layer_norm(x.view(B, T, N, D // N), (D // N,), eps=ln.eps).view(B, T, D)
    return y * ln.weight + ln.bias


def decoupled_reference(model, N: int, n_b: int = 1) -> Callable[[torch.Tensor], torch.Tensor]:
    """The decoupled model of BlockParallel on one device: ``fn(inp) -> logits``.

    Written independently of the sharded code: full-width weights multiplied by block-diagonal
    masks (feature slice r only talks to heads/hidden units of slice r) and grouped LayerNorms.
    """
    cfg = model.cfg
    D, mlp = cfg.dim, cfg.mlp_dim
    part_d = torch.arange(D) // (D // N)  # owner rank of each feature / head output
    part_m = torch.cat([torch.full((len(c),), r) for r, c in enumerate(torch.tensor_split(torch.arange(mlp), N))])
    m_dd = (part_d[:, None] == part_d[None, :]).float()  # (D, D)
    m_md = (part_m[:, None] == part_d[None, :]).float()  # (mlp, D)
    starts = set(group_starts(cfg.n_layers, n_b))

    if cfg.kind == "llama":
        return _decoupled_llama(model, N, n_b, m_dd, m_md, part_d, starts)

    @torch.inference_mode()
    def fn(inp: torch.Tensor) -> torch.Tensor:
        x = model.embed(inp)
        T = x.shape[1]
        mask = global_mask(model, 0, T, T)
        for i, blk in enumerate(model.blocks):
            a, m, first = blk.attn, blk.mlp, i in starts
            h = blk.ln1(x) if first else _grouped_ln(x, blk.ln1, N)
            mqkv = torch.ones_like(m_dd) if first else m_dd
            q, k, v = (F.linear(h, lin.weight * mqkv, lin.bias) for lin in (a.q, a.k, a.v))
            x = x + F.linear(attend(q, k, v, a.head_dim, mask), a.o.weight * m_dd, a.o.bias)
            u = m.act(F.linear(_grouped_ln(x, blk.ln2, N), m.fc1.weight * m_md, m.fc1.bias))
            x = x + F.linear(u, m.fc2.weight * m_md.T, m.fc2.bias)
        return model.output(x[:, model.output_index(T)])

    return fn


def _grouped_rms(x: torch.Tensor, ln, N: int) -> torch.Tensor:
    B, T, D = x.shape
    return F.rms_norm(x.view(B, T, N, D // N), (D // N,), eps=ln.eps).view(B, T, D) * ln.weight


def _decoupled_llama(model, N, n_b, m_dd, m_md, part_d, starts):
    """decoupled_reference for the Llama family: masks over the KV rows too, grouped RMSNorms."""
    cfg = model.cfg
    part_kv = torch.arange(cfg.kv_dim) // (cfg.kv_dim // N)
    m_kd = (part_kv[:, None] == part_d[None, :]).float()  # (kv_dim, D)

    @torch.inference_mode()
    def fn(inp: torch.Tensor) -> torch.Tensor:
        x = model.embed(inp)
        T = x.shape[1]
        mask, pos = global_mask(model, 0, T, T), torch.arange(T)
        for i, blk in enumerate(model.blocks):
            a, m, first = blk.attn, blk.mlp, i in starts
            h = blk.ln1(x) if first else _grouped_rms(x, blk.ln1, N)
            mq, mk = (torch.ones_like(m_dd), torch.ones_like(m_kd)) if first else (m_dd, m_kd)
            q = a.rotate(F.linear(h, a.q.weight * mq, a.q.bias), pos)
            k = a.rotate(F.linear(h, a.k.weight * mk, a.k.bias), pos)
            v = F.linear(h, a.v.weight * mk, a.v.bias)
            x = x + F.linear(a.mix(q, k, v, mask), a.o.weight * m_dd)
            u = _grouped_rms(x, blk.ln2, N)
            x = x + F.linear(F.silu(F.linear(u, m.gate.weight * m_md)) * F.linear(u, m.up.weight * m_md),
                             m.down.weight * m_md.T)
        return model.output(x[:, model.output_index(T)])

    return fn
