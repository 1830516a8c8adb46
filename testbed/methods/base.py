"""What every inference method shares: the Method interface, parameter resolution, the stated
communication schedule, the token split and local embeddings.

A Method runs ONE rank of a parallel inference. It only talks to other ranks through the
Communicator it was given; every rank of a job makes the same sequence of Communicator calls.

Each method states, per class and without weights or tensors:
- ``resolve_params(params, cfg)``: its params with defaults filled in and checked (the one place);
- ``schedule(cfg, tokens, world_size, params, batch)``: per rank the collectives it will call,
  with their exact messages, built from the Communicator's own plans (comm.base); tests check it
  equals the trace of a real run message for message. ``analytic_bytes`` is read off it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from testbed.comm.base import (ALL_REDUCE, ALL_REDUCE_PLANS, Communicator, all_gather_plan, choose_all_reduce,
                               plan_ops, split_sizes)
from testbed.comm.trace import Collective
from testbed.errors import ConfigError, check

FP32_BYTES = 4


@dataclass
class CommSchedule:
    """A method's communication for one (model, tokens, world size, params, batch), stated without running.

    ``collectives[r]``: rank r's Communicator calls in program order (kind and ops as its trace
    records them). ``local_tokens[r]``: tokens whose MLP rank r computes; ``keys[r]``: keys its
    queries attend to (the last one it sees, for causal models); ``output_rank``: holds the output.
    """

    method: str
    params: dict[str, Any]  # resolved
    collectives: list[list[Collective]]
    local_tokens: list[int]
    keys: list[int]
    output_rank: int

    @property
    def world_size(self) -> int:
        return len(self.collectives)

    def sent(self, rank: int) -> list[int]:
        """Payload bytes ``rank`` sends in each of its collectives."""
        return [c.bytes_sent for c in self.collectives[rank]]


class Method:
    """One rank's share of an inference. Subclasses set ``name`` and ``DEFAULTS`` (param -> default)
    and state their schedule in ``_schedule``."""

    name = "method"
    DEFAULTS: dict[str, Any] = {}

    def __init__(self, model, params: dict[str, Any], rank: int, world_size: int, comm: Communicator,
                 tokens: int, codebook_path: str | None = None):
        self.model, self.rank, self.world_size, self.comm, self.tokens = model, rank, world_size, comm, tokens
        self.cfg = model.cfg
        self.params = self._resolve(params, codebook_path)
        self.layout = self.schedule(self.cfg, tokens, world_size, self.params)  # checks world size and tokens
        check(comm.world_size == world_size and comm.rank == rank, "world_size", world_size,
              f"the communicator's world size ({comm.world_size}) and rank ({comm.rank})")
        self.output_rank = self.layout.output_rank

    def _resolve(self, params: dict[str, Any] | None, codebook_path: str | None) -> dict[str, Any]:
        return self.resolve_params(params, self.cfg)

    # -- what the class states without running ---------------------------------------------------
    @classmethod
    def resolve_params(cls, params: dict[str, Any] | None, cfg=None) -> dict[str, Any]:
        """Defaults overlaid with ``params``, every value checked (ConfigError naming the param).

        ``cfg`` None: only what needs no model (checks against the model's sizes are skipped).
        Resolving resolved params returns them unchanged.
        """
        p = parse_params(cls.name, params, cls.DEFAULTS)
        cls._check_params(p, cfg)
        return p

    @classmethod
    def _check_params(cls, p: dict[str, Any], cfg) -> None:
        """Fill model-dependent defaults in ``p`` and check its values (in place)."""

    @classmethod
    def schedule(cls, cfg, tokens: int, world_size: int, params: dict[str, Any] | None = None,
                 batch: int = 1) -> CommSchedule:
        """Every rank's collectives for inputs of ``tokens`` tokens and batch ``batch`` (no weights needed)."""
        check(isinstance(world_size, int) and not isinstance(world_size, bool) and world_size >= 1,
              "world_size", world_size, "an integer >= 1")
        check(isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 1, "tokens", tokens,
              "an integer >= 1")
        check(isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1, "batch", batch, "an integer >= 1")
        return cls._schedule(cfg, tokens, world_size, cls.resolve_params(params, cfg), batch)

    @classmethod
    def _schedule(cls, cfg, T: int, N: int, p: dict[str, Any], batch: int) -> CommSchedule:
        raise NotImplementedError

    @classmethod
    def settle(cls, params: dict[str, Any], cfg, tokens: int, world_size: int, batch: int = 1,
               flat: bool = True, delay_ms: float | None = None) -> dict[str, Any]:
        """``params`` with the choices left to the run made for this job (``flat``: the ranks' paths
        share no link; ``delay_ms``: the shaped links' one-way delay, None where links are not
        shaped), so the job runs and the row records what ran. Default: unchanged."""
        return dict(params)

    # -- one rank at run time ---------------------------------------------------------------------
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

    # -- decode after prefill (methods.decode) ----------------------------------------------------
    _keep_cache = False  # set while a prefill must leave its KV cache in self._cache

    def generate(self, inp: torch.Tensor, n: int) -> tuple[torch.Tensor | None, list[float]]:
        """Prefill ``inp``, then greedy-decode until ``n`` tokens are generated.

        Returns (ids [B, n] on ``output_rank`` else None, seconds from the start of prefill to each
        token: the first is the time to first token). Every rank calls it; ranks whose decode needs
        them take part in every step (see ``_decode_step``).
        """
        from testbed.methods.decode import check_decodes

        check_decodes(self.name, self.cfg, n)
        t0 = time.perf_counter()
        self._keep_cache, self._cache = True, None
        try:
            logits = self.forward(inp)
        finally:
            self._keep_cache = False
        logits = getattr(self, "_all_logits", None) if logits is None else logits
        self.prefill_output = logits
        ids, times = [], [time.perf_counter() - t0]
        with torch.inference_mode():
            for i in range(n):
                nxt = None if logits is None else logits.argmax(-1, keepdim=True)  # (B, 1)
                ids.append(nxt)
                if i + 1 < n:
                    logits = self._decode_step(nxt, self.tokens + i)
                    times.append(time.perf_counter() - t0)
        self._cache = None
        return (torch.cat(ids, 1) if self.rank == self.output_rank else None), times

    def _decode_step(self, ids: torch.Tensor | None, pos: int) -> torch.Tensor | None:
        """Logits of the token ``ids`` [B, 1] at ``pos`` where this rank computes them (else None)."""
        raise NotImplementedError

    @classmethod
    def decode_schedule(cls, cfg, tokens: int, world_size: int, params: dict[str, Any] | None = None,
                        batch: int = 1, generate: int = 1) -> list[list[Collective]]:
        """Per rank the collectives of the ``generate - 1`` decode steps after prefill (the first token
        comes from prefill's logits), in program order."""
        p = cls.resolve_params(params, cfg)
        per_step = cls._decode_calls(cfg, world_size, p, batch)
        return stack(per_step * max(generate - 1, 0), world_size)

    @classmethod
    def _decode_calls(cls, cfg, N: int, p: dict[str, Any], batch: int) -> list[list[Collective]]:
        """One decode step's collectives, each as every rank records it (default: none)."""
        return []

    def analytic_bytes(self, tokens: int, batch: int = 1) -> dict[str, Any]:
        """Payload bytes this rank sends per inference, read off the stated schedule: ``per_block``
        (list, one entry per block or per all-gather round) and ``total`` (everything, final gathers
        included)."""
        sent = self.schedule(self.cfg, tokens, self.world_size, self.params, batch).sent(self.rank)
        return self._summarize(sent)

    def _summarize(self, sent: list[int]) -> dict[str, Any]:
        """``analytic_bytes`` from the bytes of each collective (default: one entry per collective)."""
        return {"per_block": sent, "total": sum(sent)}

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

    Causal LMs (GPT-2, Llama) embed only those ids (at their global positions). ViT runs the patch convolution on
    the whole image and slices: every rank holds the image, the convolution is ~1-2% of a
    rank's compute, and slicing keeps the embeddings bit-identical to the single-device run.
    """
    if model.cfg.kind != "vit":
        check(inp.shape[1] <= model.cfg.max_positions, "tokens", inp.shape[1], f"<= max_positions={model.cfg.max_positions}")
        return model.embed_positions(inp[:, start:end], start)
    return model.embed(inp)[:, start:end]


def n_tokens(model, inp: torch.Tensor) -> int:
    """Token count T of a full input (ViT: patches + CLS; LMs: prompt length)."""
    if model.cfg.kind != "vit":
        return int(inp.shape[1])
    p = model.cfg.patch_size
    return 1 + (inp.shape[-2] // p) * (inp.shape[-1] // p)


def check_divides_heads(cfg, world_size: int) -> None:
    check(cfg.n_heads % world_size == 0, "world_size", world_size,
          f"a divisor of the model's head count n_heads={cfg.n_heads}")


def gathers(payloads: list[int]) -> list[Collective]:
    """One all_gather as each rank records it, rank r contributing ``payloads[r]`` bytes."""
    n = len(payloads)
    return [Collective("all_gather", plan_ops(all_gather_plan(r, n), payloads)) for r in range(n)]


def reduces(numel: int, elem_bytes: int, world_size: int, algorithm: str) -> list[Collective] | None:
    """One all_reduce of ``numel`` elements with ``algorithm`` (ring | direct) as each rank records
    it (None for one rank: no call is recorded)."""
    if world_size == 1:
        return None
    chunks = [k * elem_bytes for k in split_sizes(numel, world_size)]
    plan = ALL_REDUCE_PLANS[algorithm]
    return [Collective("all_reduce", plan_ops(plan(r, world_size), chunks)) for r in range(world_size)]


ALL_REDUCE_CHOICES = ("auto", *ALL_REDUCE)


def check_all_reduce_param(p: dict[str, Any]) -> None:
    check(p["all_reduce"] in ALL_REDUCE_CHOICES, "all_reduce", p["all_reduce"], " | ".join(ALL_REDUCE_CHOICES))


def all_reduce_algorithm(choice: str, nbytes: int, world_size: int, flat: bool = True,
                         delay_ms: float | None = None) -> str:
    """The algorithm an ``all_reduce`` param runs for payloads of ``nbytes`` bytes: itself, or for
    ``auto`` the Communicator's default (``flat``: the ranks' paths share no link; in-process and
    loopback runs are flat, the experiment states it for its topology; ``delay_ms``: the shaped
    links' one-way delay, None where they are not shaped)."""
    return choose_all_reduce(nbytes, world_size, flat, delay_ms) if choice == "auto" else choice


def packed_bytes(n_codes: int, bits: int) -> int:
    """ceil(n_codes * bits / 8): bytes of n_codes bit-packed codes."""
    return math.ceil(n_codes * bits / 8)


def global_mask(model, q_start: int, q_end: int, T: int) -> torch.Tensor | None:
    """The global causal mask rows of local queries [q_start, q_end) over all T keys (None for ViT)."""
    if not model.causal:
        return None
    from testbed.models.layers import causal_mask

    return causal_mask(torch.arange(q_start, q_end), torch.arange(T))


def stack(calls: list[list[Collective]], world_size: int) -> list[list[Collective]]:
    """Per rank, its Collective of each call in order (fresh objects: traces are filled in place)."""
    return [[Collective(c[r].kind, c[r].ops) for c in calls] for r in range(world_size)]
