"""Schedules of every method computed from its communication pattern, for sizes nobody measured.

A schedule here is what the methods' traces record (see testbed/methods and the
Communicator's algorithms in comm/base.py), without running them: per rank, the
sequence of compute segments and collectives with their exact messages. Compute
segment ``j`` is the time between collective ``j-1`` and collective ``j`` (the
last one runs to the end); its duration is filled in by the caller (from
measured traces or from a fit, see extrapolate.py).

A test checks that these schedules equal the traces the real methods record,
message for message, so a change in a method shows up there.

Patterns (B batch, T tokens, N ranks, D hidden, L blocks, fp32 = 4 bytes):
- single: rank 0 computes everything, no messages.
- tensor_parallel: per block two ring all-reduces of [B, T, D] fp32.
- sequence_parallel(_int8): per block one all-gather of each rank's h chunk
  (B*t_r*D*4 bytes, or B*t_r*(D+4) as int8 with per-token scales).
- block_parallel: one all-gather of [B, T, D/N] fp32 slices per group of n_b blocks.
- astra: per block one all-gather of 8-byte header + bit-packed codes
  (ceil(B*t_r*G*b/8) bytes); ViT with dct adds a final all-gather of the [B, D] CLS vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from testbed.comm.trace import Collective
from testbed.errors import check
from testbed.methods.vq import code_bits
from testbed.methods.base import FP32_BYTES, check_divides_heads, packed_bytes, parse_params, token_chunks
from testbed.models import ModelConfig, get_config

METHOD_NAMES = ("single", "tensor_parallel", "sequence_parallel", "sequence_parallel_int8", "block_parallel", "astra")
TOKEN_SPLIT = ("sequence_parallel", "sequence_parallel_int8", "astra")  # ranks hold token chunks
WIDTH_SPLIT = ("tensor_parallel", "block_parallel")  # ranks hold all tokens, a slice of the width

_DEFAULTS: dict[str, dict[str, Any]] = {  # the methods' own parameters (testbed/methods/*.DEFAULTS)
    "single": {}, "tensor_parallel": {}, "sequence_parallel": {}, "sequence_parallel_int8": {},
    "block_parallel": {"n_b": 1},
    "astra": {"groups": None, "codebook_size": None, "dct": None, "lookup_tables": "auto", "calibration_samples": 2},
}
ASTRA_HEADER_BYTES = 8  # testbed.methods.astra.HEADER_BYTES


@dataclass(frozen=True)
class RankShape:
    """What the compute of one rank depends on (feature inputs of the fit), in tokens."""

    local_tokens: int  # tokens this rank computes the MLP for (T for width-split methods)
    keys: int  # keys its queries attend to (T; for causal token-split: up to the end of its chunk)
    is_output: bool  # holds the model output (runs the head)


@dataclass
class Skeleton:
    """Per rank: collectives in order; compute segment j runs before collectives[j] (and one after the last)."""

    method: str
    tokens: int
    nodes: int
    collectives: list[list[Collective]]
    shapes: list[RankShape]

    def n_segments(self, rank: int) -> int:
        return len(self.collectives[rank]) + 1


def all_gather_ops(payloads: list[int], rank: int) -> list[tuple[str, int, int]]:
    """Communicator.all_gather: send own payload to every peer (starting after self), then recv each."""
    n = len(payloads)
    peers = [(rank + i) % n for i in range(1, n)]
    return [("send", p, payloads[rank]) for p in peers] + [("recv", p, payloads[p]) for p in peers]


def ring_all_reduce_ops(numel: int, elem_bytes: int, n: int, rank: int) -> list[tuple[str, int, int]]:
    """Communicator.all_reduce: ring reduce-scatter then ring all-gather of torch.tensor_split chunks."""
    base, extra = divmod(numel, n)
    return ring_ops([(base + (1 if i < extra else 0)) * elem_bytes for i in range(n)], rank)


def ring_ops(chunk_bytes: list[int], rank: int) -> list[tuple[str, int, int]]:
    """The ring's messages for chunks of the given sizes: step s of the reduce-scatter sends chunk
    rank-s to the right and receives chunk rank-s-1 from the left; the all-gather steps move the
    reduced chunks on (chunk rank+1-s out, rank-s in)."""
    n = len(chunk_bytes)
    size = chunk_bytes
    right, left = (rank + 1) % n, (rank - 1) % n
    ops = []
    for s in range(n - 1):
        ops += [("send", right, size[(rank - s) % n]), ("recv", left, size[(rank - s - 1) % n])]
    for s in range(n - 1):
        ops += [("send", right, size[(rank + 1 - s) % n]), ("recv", left, size[(rank - s) % n])]
    return ops


def resolve_params(method: str, params: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """The method's params with its defaults filled in, as the method itself resolves them."""
    check(method in METHOD_NAMES, "method", method, " | ".join(METHOD_NAMES))
    p = parse_params(method, params, _DEFAULTS[method])
    if method == "astra":
        p["groups"] = 1 if p["groups"] is None else p["groups"]
        p["codebook_size"] = 1024 if p["codebook_size"] is None else p["codebook_size"]
        p["dct"] = cfg.kind == "vit" if p["dct"] is None else p["dct"]
        check(isinstance(p["groups"], int) and p["groups"] >= 1 and cfg.dim % p["groups"] == 0, "groups",
              p["groups"], f"a positive divisor of the hidden size D={cfg.dim}")
        check(isinstance(p["codebook_size"], int) and 2 <= p["codebook_size"] <= 1 << 24, "codebook_size",
              p["codebook_size"], "an integer K in 2..2^24")
    if method == "block_parallel":
        check(isinstance(p["n_b"], int) and 1 <= p["n_b"] <= cfg.n_layers, "n_b", p["n_b"],
              f"an integer number of blocks per group in 1..{cfg.n_layers}")
    return p


def skeleton(model: str | ModelConfig, method: str, params: dict[str, Any], tokens: int, nodes: int,
             batch: int = 1) -> Skeleton:
    """The schedule of ``method`` on ``nodes`` ranks for ``tokens`` input tokens (no durations yet)."""
    cfg = get_config(model)
    p = resolve_params(method, params, cfg)
    check(isinstance(nodes, int) and nodes >= 1, "nodes", nodes, "an integer >= 1")
    check(isinstance(tokens, int) and tokens >= 1, "tokens", tokens, "an integer >= 1")
    n, T, D, L = nodes, tokens, cfg.dim, cfg.n_layers
    if cfg.kind == "gpt2":
        check(T <= cfg.max_positions, "tokens", T, f"an integer in [1, {cfg.max_positions}] for this GPT-2")
    else:
        check(T >= 2, "tokens", T, "an integer >= 2 for ViT (patches + CLS)")
    if method in WIDTH_SPLIT and n > 1:
        check_divides_heads(cfg, n)
    colls: list[list[Collective]] = [[] for _ in range(n)]
    shapes: list[RankShape] = []
    if method == "single":
        shapes = [RankShape(T if r == 0 else 0, T if r == 0 else 0, r == 0) for r in range(n)]
    elif method == "tensor_parallel":
        for r in range(n):
            if n == 1:  # all_reduce of one rank returns at once, unrecorded
                break
            colls[r] = [Collective("all_reduce", ring_all_reduce_ops(batch * T * D, FP32_BYTES, n, r))
                        for _ in range(2 * L)]
        shapes = [RankShape(T, T, r == 0) for r in range(n)]
    elif method == "block_parallel":
        rounds = len(range(0, L, p["n_b"]))
        width = [(r + 1) * D // n - r * D // n for r in range(n)]
        for r in range(n):
            colls[r] = [Collective("all_gather", all_gather_ops([batch * T * w * FP32_BYTES for w in width], r))
                        for _ in range(rounds)]
        shapes = [RankShape(T, T, r == 0) for r in range(n)]
    else:
        colls, shapes = _token_split(cfg, method, p, T, n, batch)
    return Skeleton(method, T, n, colls, shapes)


def _token_split(cfg: ModelConfig, method: str, p: dict[str, Any], T: int, n: int, batch: int
                 ) -> tuple[list[list[Collective]], list[RankShape]]:
    """sequence_parallel(_int8) and astra: one all-gather of each rank's chunk per block."""
    D, L = cfg.dim, cfg.n_layers
    if method in ("sequence_parallel", "sequence_parallel_int8"):
        chunks = token_chunks(T, n)
        per_token = D * FP32_BYTES if method == "sequence_parallel" else D + FP32_BYTES
        payloads = [batch * (e - s) * per_token for s, e in chunks]
        out = _output_index(cfg, T)
        colls = [[Collective("all_gather", all_gather_ops(payloads, r)) for _ in range(L)] for r in range(n)]
        return colls, [RankShape(e - s, e if cfg.causal else T, s <= out < e) for s, e in chunks]
    cls = 1 if p["dct"] else 0  # astra
    check(n <= T - cls, "nodes", n, f"1..{T - cls}: at most one rank per exchanged token (tokens={T})")
    chunks = token_chunks(T - cls, n)
    bits = code_bits(p["codebook_size"])
    payloads = [ASTRA_HEADER_BYTES + packed_bytes(batch * (e - s) * p["groups"], bits) for s, e in chunks]
    out_rank = n - 1 if cfg.causal else 0
    colls = []
    for r in range(n):
        colls.append([Collective("all_gather", all_gather_ops(payloads, r)) for _ in range(L)])
        if cls:  # distributed class tokens: the N final CLS vectors, gathered once
            colls[r].append(Collective("all_gather", all_gather_ops([batch * D * FP32_BYTES] * n, r)))
    shapes = [RankShape(e - s + cls, (e + cls) if cfg.causal else T, r == out_rank) for r, (s, e) in enumerate(chunks)]
    return colls, shapes


def _output_index(cfg: ModelConfig, T: int) -> int:
    """Token whose final state the head reads: CLS (0) for ViT, the last prompt token for GPT-2."""
    return T - 1 if cfg.causal else 0
