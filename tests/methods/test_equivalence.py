"""Sharded methods against the single-device model: same outputs, and the bytes they state."""

from __future__ import annotations

import pytest
import torch

from testbed.methods import decoupled_reference

T = 11  # not divisible by 2, 3 or 4 (ViT: 10 patches + CLS, also not divisible by 3 or 4)
BATCH = 2
KINDS = ["vit", "gpt2"]
WORLDS = [2, 3, 4]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["tensor_parallel", "sequence_parallel"])
@pytest.mark.parametrize("n", WORLDS)
def test_exact_methods_equal_single(mt, tiny_models, kind, name, n):
    model = tiny_models[kind]
    inp = model.make_input(T, batch=BATCH, seed=3)
    run = mt.run(model, name, n, inp, T)
    torch.testing.assert_close(run.output, mt.single(model, inp), rtol=1e-5, atol=1e-5)
    assert [r.out is None for r in run.ranks] == [i != run.output_rank for i in range(n)]
    mt.assert_bytes_match(run)


@pytest.mark.parametrize("kind,expected_rank", [("vit", 0), ("gpt2", 3)])
def test_sequence_parallel_output_on_the_rank_holding_the_output_token(mt, tiny_models, kind, expected_rank):
    model = tiny_models[kind]
    run = mt.run(model, "sequence_parallel", 4, model.make_input(T), T)
    assert run.output_rank == expected_rank


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", WORLDS)
def test_sequence_parallel_int8_is_close_to_single(mt, tiny_models, kind, n):
    model = tiny_models[kind]
    inp = model.make_input(T, batch=BATCH, seed=4)
    run, ref = mt.run(model, "sequence_parallel_int8", n, inp, T), mt.single(model, inp)
    err = (run.output - ref).abs().max().item()
    print(f"\nsp-int8 {kind} N={n}: max abs err {err:.2e} (logits up to {ref.abs().max().item():.2f})")
    # int8 absmax rounding: each received value is off by <= max|h|/254, so a few 1e-3 at most here
    assert 0 < err < 0.02 * ref.abs().max().item()
    assert torch.equal(run.output.argmax(-1), ref.argmax(-1))
    mt.assert_bytes_match(run)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["tensor_parallel", "sequence_parallel", "sequence_parallel_int8",
                                  "block_parallel", "astra"])
def test_one_rank_is_exactly_single(mt, tiny_models, kind, name, tmp_path):
    model = tiny_models[kind]
    inp = model.make_input(T, batch=BATCH, seed=5)
    params = {"codebook_size": 4} if name == "astra" else None  # N=1: nothing is quantized
    run = mt.run(model, name, 1, inp, T, params)
    assert torch.equal(run.output, mt.single(model, inp))
    assert run.ranks[0].trace.bytes_sent == 0 == run.ranks[0].analytic["total"]


def test_single_idles_other_ranks(mt, tiny_models):
    model = tiny_models["vit"]
    inp = model.make_input(T)
    run = mt.run(model, "single", 3, inp, T)
    assert torch.equal(run.output, mt.single(model, inp))
    assert run.ranks[1].out is None and run.ranks[2].out is None
    assert all(r.trace.bytes_sent == 0 and not r.trace.collectives() for r in run.ranks)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("n_b", [1, 2])
def test_block_parallel_equals_its_decoupled_reference(mt, tiny_models, kind, n, n_b):
    model = tiny_models[kind]
    inp = model.make_input(T, batch=BATCH, seed=6)
    run = mt.run(model, "block_parallel", n, inp, T, {"n_b": n_b})
    torch.testing.assert_close(run.output, decoupled_reference(model, n, n_b)(inp), rtol=1e-5, atol=1e-5)
    mt.assert_bytes_match(run)
    assert len(run.ranks[0].trace.collectives("all_gather")) == -(-model.cfg.n_layers // n_b)
    ref = mt.single(model, inp)
    # reported, not asserted: the decoupled model is a different architecture (see block_parallel.py)
    print(f"\nbp {kind} N={n} n_b={n_b}: top-1 vs single {(run.output.argmax(-1) == ref.argmax(-1)).float().mean():.2f}, "
          f"max abs err {(run.output - ref).abs().max().item():.3f}")


def test_decoupled_reference_with_one_rank_is_the_model(tiny_models):
    model = tiny_models["gpt2"]
    inp = model.make_input(T, batch=BATCH)
    torch.testing.assert_close(decoupled_reference(model, 1, 1)(inp), model(inp), rtol=1e-6, atol=1e-6)


def test_block_parallel_with_uneven_last_group(mt):
    from testbed.models import build_model, get_config

    model = build_model(get_config("gpt2-tiny", dim=96, n_heads=12, n_layers=3))
    inp = model.make_input(T, batch=1, seed=7)
    run = mt.run(model, "block_parallel", 2, inp, T, {"n_b": 2})  # groups of 2 and 1 blocks
    torch.testing.assert_close(run.output, decoupled_reference(model, 2, 2)(inp), rtol=1e-5, atol=1e-5)
    mt.assert_bytes_match(run)
    assert len(run.ranks[0].analytic["per_block"]) == 2



@pytest.mark.parametrize("method,params", [("sequence_parallel", {}), ("tensor_parallel", {}),
                                           ("astra", {"groups": 2, "codebook_size": 16})])
def test_rank_runner_runs_methods_from_a_job_spec(method, params):
    import threading

    from testbed.comm import InProcessGroup
    from testbed.methods.job import JobSpec, RankRunner
    from testbed.models import build_model

    job = JobSpec(model="gpt2-tiny", method=method, world_size=2, tokens=T, params=params, seed=1)
    group = InProcessGroup(2, timeout_s=60)
    # built one after the other: models.new_model seeds the process-global RNG, so two threads
    # building at once interleave their draws and get different weights (reported, not ours to fix)
    runners = [RankRunner(job, r, group.communicator(r)) for r in range(2)]
    res: list = [None, None]
    threads = [threading.Thread(target=lambda r=r: res.__setitem__(r, runners[r].infer())) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out_rank = runners[0].method.output_rank
    assert res[1 - out_rank][0] is None
    model = build_model("gpt2-tiny", seed=1)
    ref = model(model.make_input(T, seed=1))
    if method == "astra":
        assert res[out_rank][0].shape == ref.shape and runners[0].comm.trace.bytes_sent > 0
    else:
        torch.testing.assert_close(res[out_rank][0], ref, rtol=1e-5, atol=1e-5)
