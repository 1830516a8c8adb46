"""Decode after prefill: generated ids equal single's greedy decode for every exact method, the
traces equal the stated decode schedules, and no rank ever receives a KV cache."""

from __future__ import annotations

import pytest
import torch

from testbed.comm import run_inprocess
from testbed.errors import ConfigError
from testbed.methods import build_method, method_class, vq
from testbed.methods.decode import check_decodes, greedy

T, BATCH, NEW = 11, 2, 5


def _generate(model, name, n, inp, params=None, codebook_path=None):
    def body(rank, comm):
        m = build_method(name, model, params, rank, n, comm, tokens=T, codebook_path=codebook_path)
        comm.trace.start()
        ids, times = m.generate(inp, NEW)
        comm.trace.finish()
        return m, ids, times, comm.trace

    return run_inprocess(n, body, timeout_s=60)


@pytest.mark.parametrize("kind", ["llama", "llama-mqa", "gpt2"])
@pytest.mark.parametrize("name,n", [("single", 2), ("tensor_parallel", 2), ("tensor_parallel", 4),
                                    ("sequence_parallel", 3), ("sequence_parallel", 4)])
def test_exact_methods_generate_singles_greedy_tokens(tiny_models, kind, name, n):
    model = tiny_models[kind]
    inp = model.make_input(T, batch=BATCH, seed=21)
    ranks = _generate(model, name, n, inp)
    out = ranks[0][0].output_rank
    ref = greedy(model, inp, NEW)
    assert ref.shape == (BATCH, NEW)
    assert torch.equal(ranks[out][1], ref)
    assert all(r[1] is None for i, r in enumerate(ranks) if i != out)
    times = ranks[out][2]
    assert len(times) == NEW and all(b > a for a, b in zip(times, times[1:]))
    cls = method_class(name)
    prefill = cls.schedule(model.cfg, T, n, {}, BATCH).collectives
    steps = cls.decode_schedule(model.cfg, T, n, {}, BATCH, NEW)
    for r, (_, _, _, trace) in enumerate(ranks):
        assert [(c.kind, c.ops) for c in trace.collectives()] == [(c.kind, c.ops) for c in prefill[r] + steps[r]]


def test_no_rank_receives_a_kv_cache(tiny_models):
    """Per decode step the most any rank receives is TP's all-reduce chunks of one token's [B, 1, D]
    sum: far below one block's cache (2 x B x T x kv_dim floats) and independent of T."""
    model = tiny_models["llama"]
    cfg, n = model.cfg, 4
    for name in ("tensor_parallel", "sequence_parallel", "astra"):
        params = {"codebook_size": 8, "calibration_samples": 1} if name == "astra" else None
        ranks = _generate(model, name, n, model.make_input(T, batch=BATCH, seed=22), params)
        prefill = len(method_class(name).schedule(cfg, T, n, params, BATCH).collectives[0])
        for _, _, _, trace in ranks:
            steps = trace.collectives()[prefill:]
            per_step = sum(c.bytes_recv for c in steps) / (NEW - 1)
            assert per_step <= 2 * cfg.n_layers * 2 * BATCH * cfg.dim * 4  # TP ring: 2(N-1)/N of [B, 1, D]
            assert all(c.bytes_recv < 2 * BATCH * T * cfg.kv_dim * 4 for c in steps)
            if name != "tensor_parallel":
                assert steps == []  # sequence-parallel methods: the last rank decodes from its own cache


def test_astra_decodes_from_its_mixed_precision_cache(tiny_models, tmp_path):
    """With exact codebooks for the prompt, the prompt's cache is exact, so the tokens equal single's."""
    model = tiny_models["llama"]
    inp = model.make_input(T, batch=BATCH, seed=23)
    path = tmp_path / "exact.pt"
    vq.save_codebooks(path, vq.exact_codebooks(model, inp, 2), {})
    ranks = _generate(model, "astra", 3, inp, codebook_path=str(path))
    assert torch.equal(ranks[2][1], greedy(model, inp, NEW))


def test_methods_without_decode_and_models_that_do_not_generate_fail_clearly(tiny_models):
    with pytest.raises(ConfigError, match="generate.*block_parallel"):
        check_decodes("block_parallel", tiny_models["llama"].cfg, 4)
    with pytest.raises(ConfigError, match="generate.*only causal LMs"):
        check_decodes("single", tiny_models["vit"].cfg, 4)
    check_decodes("block_parallel", tiny_models["llama"].cfg, 0)  # prefill only: fine
