"""Shared helpers for method tests: tiny models and an in-process run of one method on N ranks."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from testbed.comm import run_inprocess
from testbed.comm.trace import Trace
from testbed.methods import build_method
from testbed.models import build_model, get_config

# 12 heads so that TP and BP split evenly over N = 2, 3 and 4
TINY = {
    "vit": get_config("vit-tiny", dim=96, n_heads=12),
    "gpt2": get_config("gpt2-tiny", dim=96, n_heads=12),
    # GQA: 6 KV heads (split over N = 2, 3; replicated over 4); MQA with Qwen2's q/k/v biases
    "llama": get_config("llama-tiny"),
    "llama-mqa": get_config("llama-tiny", n_kv_heads=1, qkv_bias=True, tie_embeddings=True),
}


@dataclass
class RankResult:
    out: torch.Tensor | None
    trace: Trace
    analytic: dict
    method: object


@dataclass
class Run:
    ranks: list[RankResult]

    @property
    def output_rank(self) -> int:
        return self.ranks[0].method.output_rank

    @property
    def output(self) -> torch.Tensor:
        return self.ranks[self.output_rank].out


def run_method(model, name: str, world_size: int, inp: torch.Tensor, tokens: int, params: dict | None = None,
               codebook_path: str | None = None) -> Run:
    """Build and run ``name`` on every rank in threads; keep each rank's output, trace and analytic bytes."""
    batch = inp.shape[0]

    def body(rank, comm):
        m = build_method(name, model, params, rank, world_size, comm, tokens=tokens, codebook_path=codebook_path)
        comm.trace.start()
        out = m.forward(inp)
        comm.trace.finish()
        return RankResult(out, comm.trace, m.analytic_bytes(tokens, batch), m)

    return Run(run_inprocess(world_size, body, timeout_s=60))


@pytest.fixture(scope="session")
def tiny_models():
    return {kind: build_model(cfg, seed=0) for kind, cfg in TINY.items()}


def single_output(model, inp: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(inp)


def assert_bytes_match(run: Run) -> None:
    """Every rank's traced bytes equal its analytic formula, in total and collective by collective."""
    for r, rr in enumerate(run.ranks):
        assert rr.trace.bytes_sent == rr.analytic["total"], f"rank {r}"
        sent = [c.bytes_sent for c in rr.trace.collectives()]
        expect = list(rr.analytic["per_block"])
        if rr.analytic.get("final"):
            expect.append(rr.analytic["final"])
        if rr.analytic["total"] == 0:
            assert sum(sent) == 0, f"rank {r}"
            continue
        if rr.trace.collectives("all_reduce"):  # TP: two all-reduces per block
            sent = [a + b for a, b in zip(sent[::2], sent[1::2])]
        assert sent == expect, f"rank {r}"


class Helpers:
    """What the tests use, handed out as one fixture (test modules cannot import conftest under
    pytest's importlib mode)."""

    TINY = TINY
    run = staticmethod(run_method)
    single = staticmethod(single_output)
    assert_bytes_match = staticmethod(assert_bytes_match)


@pytest.fixture(scope="session")
def mt() -> Helpers:
    return Helpers()
