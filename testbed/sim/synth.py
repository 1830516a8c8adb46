"""Schedules of every method for sizes nobody measured, from the methods' own stated schedules.

A skeleton is what the methods' traces record, without running them: per rank, the
sequence of compute segments and collectives with their exact messages. The
collectives come from ``testbed.methods.comm_schedule`` (each method states its
schedule, built from the Communicator's plans in comm/base.py; tests check it equals
real traces message for message). Compute segment ``j`` is the time between
collective ``j-1`` and collective ``j`` (the last one runs to the end); its duration
is filled in by the caller (from measured traces or from a fit, see extrapolate.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from testbed.comm.trace import Collective
from testbed.errors import check
from testbed.methods import METHODS, comm_schedule, resolve_params
from testbed.models import ModelConfig, get_config

METHOD_NAMES = METHODS
TOKEN_SPLIT = ("sequence_parallel", "sequence_parallel_int8", "astra")  # ranks hold token chunks
WIDTH_SPLIT = ("tensor_parallel", "block_parallel")  # ranks hold all tokens, a slice of the width


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


def skeleton(model: str | ModelConfig, method: str, params: dict[str, Any], tokens: int, nodes: int,
             batch: int = 1) -> Skeleton:
    """The schedule of ``method`` on ``nodes`` ranks for ``tokens`` input tokens (no durations yet)."""
    cfg = get_config(model)
    check(method in METHOD_NAMES, "method", method, " | ".join(METHOD_NAMES))
    resolve_params(method, params, cfg)  # a bad param is reported before the sizes
    check(isinstance(nodes, int) and nodes >= 1, "nodes", nodes, "an integer >= 1")
    check(isinstance(tokens, int) and tokens >= 1, "tokens", tokens, "an integer >= 1")
    if cfg.causal:
        check(tokens <= cfg.max_positions, "tokens", tokens,
              f"an integer in [1, {cfg.max_positions}] for this {cfg.kind} model")
    else:
        check(tokens >= 2, "tokens", tokens, "an integer >= 2 for ViT (patches + CLS)")
    s = comm_schedule(method, cfg, tokens, nodes, params, batch)
    shapes = [RankShape(t, k, r == s.output_rank) for r, (t, k) in enumerate(zip(s.local_tokens, s.keys))]
    return Skeleton(method, tokens, nodes, s.collectives, shapes)
