"""Every method's stated schedule (Method.schedule, no weights) equals the trace of a real run,
message for message, and analytic_bytes is what the trace sent."""

from __future__ import annotations

import pytest

from testbed.methods import comm_schedule, resolve_params
from testbed.methods.astra import HEADER_BYTES, message_bytes
from testbed.models import build_model, get_config

ASTRA_FAST = {"codebook_size": 8, "calibration_samples": 1}

# (model kind, method, N, T, params, batch); T is uneven over N wherever tokens are split
CASES = [
    ("vit", "single", 1, 11, {}, 1),
    ("vit", "single", 3, 11, {}, 2),
    ("gpt2", "single", 2, 9, {}, 1),
    ("vit", "tensor_parallel", 1, 11, {}, 1),
    ("vit", "tensor_parallel", 3, 11, {}, 2),
    ("gpt2", "tensor_parallel", 4, 9, {}, 1),
    ("vit", "tensor_parallel", 2, 11, {"all_reduce": "ring"}, 3),
    ("vit", "tensor_parallel", 4, 11, {"all_reduce": "ring"}, 1),  # 11*64 elements: chunks of 176
    ("gpt2", "tensor_parallel", 2, 7, {"all_reduce": "direct"}, 1),
    ("vit", "tensor_parallel", 4, 11, {"all_reduce": "direct"}, 2),
    ("vit", "sequence_parallel", 1, 11, {}, 1),
    ("vit", "sequence_parallel", 4, 18, {}, 2),
    ("gpt2", "sequence_parallel", 3, 13, {}, 1),
    ("vit", "sequence_parallel_int8", 3, 11, {}, 2),
    ("gpt2", "sequence_parallel_int8", 4, 10, {}, 3),
    ("vit", "block_parallel", 2, 11, {}, 1),
    ("vit3", "block_parallel", 3, 11, {"n_b": 2}, 2),  # groups of 2 and 1 blocks
    ("gpt2", "block_parallel", 4, 9, {"n_b": 2}, 1),
    ("vit", "astra", 1, 11, ASTRA_FAST, 1),
    ("vit", "astra", 3, 11, {**ASTRA_FAST, "groups": 2}, 2),  # dct: 10 patches over 3 ranks
    ("vit", "astra", 4, 18, {**ASTRA_FAST, "groups": 4, "codebook_size": 5}, 1),  # 3-bit codes
    ("vit", "astra", 3, 11, {**ASTRA_FAST, "dct": False}, 2),  # CLS quantized like any token
    ("gpt2", "astra", 4, 13, {**ASTRA_FAST, "groups": 3}, 2),  # causal
    ("gpt2", "astra", 2, 9, {**ASTRA_FAST, "codebook_size": 1024}, 1),
    # Llama family: GQA with KV heads split (N=3) and replicated (N=4), MQA
    ("llama", "single", 2, 9, {}, 1),
    ("llama", "tensor_parallel", 3, 11, {}, 2),
    ("llama", "tensor_parallel", 4, 9, {}, 1),
    ("llama-mqa", "tensor_parallel", 2, 9, {}, 1),
    ("llama", "sequence_parallel", 4, 13, {}, 2),
    ("llama-mqa", "sequence_parallel_int8", 3, 10, {}, 1),
    ("llama", "block_parallel", 3, 11, {"n_b": 2}, 1),
    ("llama", "astra", 4, 13, {**ASTRA_FAST, "groups": 3}, 2),
    ("llama-mqa", "astra", 2, 9, ASTRA_FAST, 1),
]


@pytest.fixture(scope="module")
def models(tiny_models, mt):
    return {**tiny_models, "vit3": build_model(get_config(mt.TINY["vit"], n_layers=3), seed=0)}


def _ops(collectives):
    return [(c.kind, c.ops) for c in collectives]


@pytest.mark.parametrize("kind, name, n, T, params, batch", CASES)
def test_stated_schedule_equals_the_trace(mt, models, kind, name, n, T, params, batch):
    model = models[kind]
    stated = comm_schedule(name, model.cfg, T, n, params, batch)
    run = mt.run(model, name, n, model.make_input(T, batch=batch, seed=1), T, params)
    assert stated.world_size == n
    for r, rr in enumerate(run.ranks):
        assert _ops(rr.trace.collectives()) == _ops(stated.collectives[r]), f"rank {r}"
        assert rr.method.params == stated.params
        assert rr.trace.bytes_sent == rr.analytic["total"] == sum(stated.sent(r))
    assert [rr.out is not None for rr in run.ranks] == [r == stated.output_rank for r in range(n)]
    mt.assert_bytes_match(run)


def test_token_shapes_follow_the_split(models):
    cfg = models["gpt2"].cfg
    s = comm_schedule("sequence_parallel", cfg, 10, 4, {})
    assert (s.local_tokens, s.keys, s.output_rank) == ([3, 3, 2, 2], [3, 6, 8, 10], 3)
    s = comm_schedule("astra", models["vit"].cfg, 11, 3, ASTRA_FAST)  # CLS copy + 4, 3, 3 patches
    assert (s.local_tokens, s.keys, s.output_rank) == ([5, 4, 4], [11, 11, 11], 0)


def test_astra_messages_are_header_plus_packed_codes(models):
    cfg = models["vit"].cfg
    s = comm_schedule("astra", cfg, 11, 3, {"groups": 2, "codebook_size": 16}, batch=2)
    # 10 patches over 3 ranks: 4, 3, 3 tokens; 2 groups of 4-bit codes per token vector
    assert [op[2] for op in s.collectives[0][0].ops] == [HEADER_BYTES + 8] * 2 + [HEADER_BYTES + 6] * 2
    assert message_bytes(2 * 4, 2, 4) == HEADER_BYTES + 8
    assert [c.kind for c in s.collectives[0]] == ["all_gather"] * (cfg.n_layers + 1)  # + the final CLS gather
    assert s.collectives[0][-1].bytes_sent == 2 * (2 * cfg.dim * 4)


def test_resolution_is_one_place_and_idempotent(models):
    vit, gpt2 = models["vit"].cfg, models["gpt2"].cfg
    p = resolve_params("astra", {}, vit)
    assert (p["groups"], p["codebook_size"], p["dct"]) == (1, 1024, True)
    assert resolve_params("astra", {}, gpt2)["dct"] is False
    assert resolve_params("astra", p, vit) == p
    assert resolve_params("astra", {"groups": 4})["dct"] is None  # without a model: no model-dependent default
    assert resolve_params("astra", {}, vit, codebook=("f.pt", 2, 64))["groups"] == 2
    assert resolve_params("block_parallel", {}, vit) == {"n_b": 1}


def test_all_reduce_choice_changes_the_schedule_not_the_bytes(models):
    cfg = models["vit"].cfg
    ring, direct, auto = (comm_schedule("tensor_parallel", cfg, 11, 4, {"all_reduce": a}) for a in ("ring", "direct", "auto"))
    assert [ring.sent(r) for r in range(4)] != [] and sum(map(sum, map(ring.sent, range(4)))) == sum(
        map(sum, map(direct.sent, range(4))))
    steps = {len(c.ops) for c in direct.collectives[0]}
    assert steps == {4 * 3}  # N-1 sends and N-1 receives in each of its 2 rounds
    assert _ops(auto.collectives[0]) == _ops(direct.collectives[0])  # in-process: flat, so auto is direct
    assert _ops(ring.collectives[0]) != _ops(direct.collectives[0])


def test_settle_makes_auto_concrete_by_topology_and_size(models):
    from testbed.methods import method_class

    cfg, tp = models["vit"].cfg, method_class("tensor_parallel")
    assert tp.settle({}, cfg, 11, 4)["all_reduce"] == "direct"  # flat: direct at any size
    assert tp.settle({}, cfg, 11, 4, flat=False)["all_reduce"] == "direct"  # 11x64 fp32: latency-bound chunks
    assert tp.settle({}, cfg, 4096, 4, flat=False)["all_reduce"] == "ring"  # 1 MiB over shared hops
    assert tp.settle({"all_reduce": "ring"}, cfg, 11, 4)["all_reduce"] == "ring"  # a stated choice stays
    assert method_class("astra").settle(ASTRA_FAST, cfg, 11, 4) == ASTRA_FAST  # nothing to settle
