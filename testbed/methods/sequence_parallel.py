"""Sequence parallelism: tokens split over N ranks in contiguous chunks; every rank holds all weights.

Per block, each rank normalizes its own tokens (h = LN1(x_local)), all-gathers h, computes its
queries from its own h and keys/values from the gathered h of all T tokens, then runs the output
projection, residual, LN2 and MLP on its own tokens only: one all-gather per block. Llama-family
models rotate queries and keys at their global positions (keys of all T tokens: every rank knows
where each chunk starts) and share KV heads among query heads (GQA); the message stays h, D wide.
Causal models use the
global causal mask (a rank's queries see earlier chunks and earlier local tokens). The output stays
on the rank that holds ``model.output_index(T)``: the CLS token (rank 0) for ViT, the last prompt
token (last rank) for GPT-2, so no final gather is needed.

``sequence_parallel_int8`` (the paper's compressed baseline) sends h as int8 with one fp32
absmax scale per token, packed into ONE uint8 tensor per block ([B*t*D] int8 bytes then [B*t]
fp32 scales); receivers dequantize, local tokens keep full precision.
"""

from __future__ import annotations

from typing import Any

import torch

from testbed.methods import decode
from testbed.methods.base import (FP32_BYTES, CommSchedule, Method, embed_range, gathers, global_mask, n_tokens,
                                  stack, token_chunks)

def int8_encode(h: torch.Tensor) -> torch.Tensor:
    """h [B, t, D] float -> uint8 [B*t*D + 4*B*t]: int8 values (round(h / s)), then the per-token
    fp32 scales s = max|h| / 127 (a zero token gets s = 1 so that it decodes to zeros)."""
    scale = h.abs().amax(-1, keepdim=True) / 127.0  # (B, t, 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).float()
    q = torch.round(h / scale).clamp(-127, 127).to(torch.int8)
    return torch.cat([q.reshape(-1).view(torch.uint8), scale.reshape(-1).view(torch.uint8)])


def int8_decode(buf: torch.Tensor, B: int, t: int, D: int) -> torch.Tensor:
    """Inverse of int8_encode -> float32 [B, t, D]."""
    n = B * t * D
    q = buf[:n].view(torch.int8).reshape(B, t, D).float()
    scale = buf[n:n + FP32_BYTES * B * t].clone().view(torch.float32).reshape(B, t, 1)
    return q * scale


class SequenceParallel(Method):
    name = "sequence_parallel"
    DEFAULTS: dict[str, Any] = {}

    def __init__(self, model, params, rank, world_size, comm, tokens, codebook_path=None):
        super().__init__(model, params, rank, world_size, comm, tokens, codebook_path)
        self.chunks = token_chunks(tokens, world_size)

    @classmethod
    def _schedule(cls, cfg, T, N, p, batch) -> CommSchedule:
        chunks = token_chunks(T, N)
        gather = gathers([cls._payload_bytes(cfg, batch, e - s) for s, e in chunks])
        out = cfg.output_index(T)
        return CommSchedule(cls.name, p, stack([gather] * cfg.n_layers, N), [e - s for s, e in chunks],
                            [e if cfg.causal else T for _, e in chunks],
                            next(r for r, (s, e) in enumerate(chunks) if s <= out < e))

    # the exchanged form of h: fp32 as is (int8 overrides these)
    def _encode(self, h: torch.Tensor) -> torch.Tensor:
        return h.contiguous()

    def _decode(self, payload: torch.Tensor, B: int, t: int) -> torch.Tensor:
        return payload

    @staticmethod
    def _payload_bytes(cfg, B: int, t: int) -> int:
        """Bytes of one rank's message for t tokens: what ``_encode`` returns, fp32 h."""
        return B * t * cfg.dim * FP32_BYTES

    def _forward(self, inp: torch.Tensor) -> torch.Tensor | None:
        T = n_tokens(self.model, inp)
        chunks = token_chunks(T, self.world_size)
        s, e = chunks[self.rank]
        x = embed_range(self.model, inp, s, e)  # (B, t, D)
        B = x.shape[0]
        mask = global_mask(self.model, s, e, T)
        pos, pos_all = torch.arange(s, e), torch.arange(T)
        for block in self.model.blocks:
            a = block.attn
            h = block.ln1(x)
            got = self.comm.all_gather(self._encode(h))
            hs = [h if r == self.rank else self._decode(p, B, ce - cs) for r, (p, (cs, ce)) in enumerate(zip(got, chunks))]
            h_all = torch.cat(hs, dim=1)  # (B, T, D), global token order
            q, k, v = a.rotate(a.q(h), pos), a.rotate(a.k(h_all), pos_all), a.v(h_all)  # rotary: global positions
            if self._keep_cache and self.rank == self.output_rank:  # K/V of every prompt token (methods.decode)
                self._cache = (self._cache or []) + [[k, v]]
            x = x + a.o(a.mix(q, k, v, mask))
            x = x + block.mlp(block.ln2(x))
        if self.rank != self.output_rank:
            return None
        return self.model.output(x[:, self.model.output_index(T) - s])

    def _decode_step(self, ids, pos):
        """The output rank decodes alone from the cache prefill left it (methods.decode)."""
        return None if self.rank != self.output_rank else decode.step(self.model, self._cache, ids, pos)


class SequenceParallelInt8(SequenceParallel):
    name = "sequence_parallel_int8"

    def _encode(self, h: torch.Tensor) -> torch.Tensor:
        return int8_encode(h)

    def _decode(self, payload: torch.Tensor, B: int, t: int) -> torch.Tensor:
        return int8_decode(payload, B, t, self.cfg.dim)

    @staticmethod
    def _payload_bytes(cfg, B: int, t: int) -> int:
        return B * t * (cfg.dim + FP32_BYTES)  # int8 values, then one fp32 scale per token
