"""What every inference method shares: the Method interface, parameter checking, the token
split, local embeddings and the byte counts of the Communicator's collectives.

A Method runs ONE rank of a parallel inference. It only talks to other ranks through the
Communicator it was given; every rank of a job makes the same sequence of Communicator calls.
``analytic_bytes`` states, from the formulas alone, how many payload bytes this rank sends;
tests compare it with what the Communicator's trace recorded, byte for byte.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from testbed.comm.base import Communicator
from testbed.errors import ConfigError, check

FP32_BYTES = 4


class Method:
    """One rank's share of an inference. Subclasses set ``name`` and ``DEFAULTS`` (param -> default)."""

    name = "method"
    DEFAULTS: dict[str, Any] = {}

    def __init__(self, model, params: dict[str, Any], rank: int, world_size: int, comm: Communicator,
                 tokens: int, codebook_path: str | None = None):
        self.model, self.rank, self.world_size, self.comm, self.tokens = model, rank, world_size, comm, tokens
        self.cfg = model.cfg
        self.params = parse_params(self.name, params, self.DEFAULTS)
        check(isinstance(world_size, int) and world_size >= 1, "world_size", world_size, "an integer >= 1")
        check(comm.world_size == world_size and comm.rank == rank, "world_size", world_size,
              f"the communicator's world size ({comm.world_size}) and rank ({comm.rank})")
        check(isinstance(tokens, int) and tokens >= 1, "tokens", tokens, "an integer >= 1")
        self.output_rank = 0

    def forward(self, inp: torch.Tensor) -> torch.Tensor | None:
        """Run this rank's part of one inference on the full input ``inp`` (every rank holds it).

        Returns the model output (logits [B, n_out]) on ``output_rank`` and None elsewhere.
        """
        T = n_tokens(self.model, inp)
        check(T == self.tokens, "tokens", T, f"the token count this method was built for ({self.tokens})")
        with torch.inference_mode():
            return self._forward(inp)

    def _forward(self, inp: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def analytic_bytes(self, tokens: int, batch: int = 1) -> dict[str, Any]:
        """Payload bytes this rank sends per inference: ``per_block`` (list, one entry per block or
        per all-gather round) and ``total`` (everything, final gathers included)."""
        raise NotImplementedError

    def describe(self) -> str:
        """The params as one short string (for tables)."""
        return ", ".join(f"{k}={v}" for k, v in self.params.items()) or "-"


def parse_params(method: str, params: dict[str, Any] | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with ``params``; an unknown key is an error, never ignored."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        allowed = ", ".join(defaults) if defaults else "none"
        raise ConfigError("params", unknown[0], f"params of method {method!r}: {allowed}")
    return {**defaults, **params}


def token_chunks(T: int, N: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) chunks of T tokens over N ranks; the first T % N are one longer."""
    check(isinstance(N, int) and 1 <= N <= T, "world_size", N, f"1..{T}: at most one rank per token (tokens={T})")
    base, extra = divmod(T, N)
    out, s = [], 0
    for r in range(N):
        e = s + base + (1 if r < extra else 0)
        out.append((s, e))
        s = e
    return out


def embed_range(model, inp: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Embeddings of tokens [start, end) of the full input: [B, end-start, D].

    GPT-2 embeds only those ids (at their global positions). ViT runs the patch convolution on
    the whole image and slices: every rank holds the image, the convolution is ~1-2% of a
    rank's compute, and slicing keeps the embeddings bit-identical to the single-device run.
    """
    if model.cfg.kind == "gpt2":
        check(inp.shape[1] <= model.cfg.max_positions, "tokens", inp.shape[1], f"<= max_positions={model.cfg.max_positions}")
        return model.embed_positions(inp[:, start:end], start)
    return model.embed(inp)[:, start:end]


def n_tokens(model, inp: torch.Tensor) -> int:
    """Token count T of a full input (ViT: patches + CLS; GPT-2: prompt length)."""
    if model.cfg.kind == "gpt2":
        return int(inp.shape[1])
    p = model.cfg.patch_size
    return 1 + (inp.shape[-2] // p) * (inp.shape[-1] // p)


def check_divides_heads(cfg, world_size: int) -> None:
    check(cfg.n_heads % world_size == 0, "world_size", world_size,
          f"a divisor of the model's head count n_heads={cfg.n_heads}")


def all_gather_bytes(payload_bytes: int, world_size: int) -> int:
    """Bytes one rank sends in Communicator.all_gather: its payload to each of the N-1 peers."""
    return (world_size - 1) * payload_bytes


def ring_all_reduce_bytes(numel: int, elem_bytes: int, world_size: int, rank: int) -> int:
    """Bytes ``rank`` sends in Communicator.all_reduce of ``numel`` elements: the ring sends one
    chunk (torch.tensor_split sizes) per step, N-1 reduce-scatter steps then N-1 all-gather steps."""
    n = world_size
    if n == 1:
        return 0
    base, extra = divmod(numel, n)
    size = [base + (1 if i < extra else 0) for i in range(n)]
    sent = sum(size[(rank - s) % n] for s in range(n - 1)) + sum(size[(rank + 1 - s) % n] for s in range(n - 1))
    return sent * elem_bytes


def packed_bytes(n_codes: int, bits: int) -> int:
    """ceil(n_codes * bits / 8): bytes of n_codes bit-packed codes."""
    return math.ceil(n_codes * bits / 8)


def global_mask(model, q_start: int, q_end: int, T: int) -> torch.Tensor | None:
    """The global causal mask rows of local queries [q_start, q_end) over all T keys (None for ViT)."""
    if not model.causal:
        return None
    from testbed.models.layers import causal_mask

    return causal_mask(torch.arange(q_start, q_end), torch.arange(T))
