"""ASTRA: lossless with exact codebooks, exact lookup tables, packed payload sizes, k-means agreement."""

from __future__ import annotations

import math

import pytest
import torch

from testbed.errors import CommError, ConfigError
from testbed.methods import vq
from testbed.methods.astra import HEADER_BYTES
from testbed.models import build_model

T = 11
BATCH = 2


def exact_file(model, inp, groups, tmp_path):
    path = tmp_path / f"exact-{groups}.pt"
    vq.save_codebooks(path, vq.exact_codebooks(model, inp, groups), {"kind": "exact"})
    return str(path)


@pytest.mark.parametrize("kind,dct", [("vit", True), ("vit", False), ("gpt2", False)])
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("groups", [1, 4])
def test_exact_codebooks_reproduce_single(mt, tiny_models, tmp_path, kind, dct, n, groups):
    model = tiny_models[kind]
    inp = model.make_input(T, batch=BATCH, seed=11)
    run = mt.run(model, "astra", n, inp, T, {"dct": dct}, codebook_path=exact_file(model, inp, groups, tmp_path))
    torch.testing.assert_close(run.output, mt.single(model, inp), rtol=1e-5, atol=1e-5)
    assert run.output_rank == (n - 1 if kind == "gpt2" else 0)
    mt.assert_bytes_match(run)


@pytest.mark.parametrize("kind", ["vit", "gpt2"])
def test_lookup_tables_equal_the_direct_path(mt, tiny_models, kind):
    model = tiny_models[kind]
    inp = model.make_input(T, batch=BATCH, seed=12)
    params = {"groups": 4, "codebook_size": 16}
    direct = mt.run(model, "astra", 3, inp, T, {**params, "lookup_tables": False})
    tables = mt.run(model, "astra", 3, inp, T, {**params, "lookup_tables": True})
    assert direct.ranks[0].method.tables is None and tables.ranks[0].method.tables is not None
    torch.testing.assert_close(tables.output, direct.output, rtol=1e-5, atol=1e-5)
    assert (direct.output - mt.single(model, inp)).abs().max() > 1e-3  # lossy codebooks: a real difference


@pytest.mark.parametrize("groups,codebook_size", [(1, 2), (2, 3), (4, 5), (8, 1024), (96, 16)])
@pytest.mark.parametrize("kind", ["vit", "gpt2"])
def test_payload_per_rank_per_block_is_packed_codes_plus_header(mt, tiny_models, kind, groups, codebook_size):
    model, n = tiny_models[kind], 4
    inp = model.make_input(T, batch=1, seed=13)
    run = mt.run(model, "astra", n, inp, T, {"groups": groups, "codebook_size": codebook_size})
    bits = math.ceil(math.log2(codebook_size))
    exchanged = T - 1 if kind == "vit" else T  # DCT: CLS copies are never sent inside blocks
    base, extra = divmod(exchanged, n)
    assert HEADER_BYTES <= 16
    for r, rr in enumerate(run.ranks):
        t_local = base + (1 if r < extra else 0)
        expect = math.ceil(t_local * groups * bits / 8) + HEADER_BYTES
        gathers = rr.trace.collectives("all_gather")
        blocks = gathers[:model.cfg.n_layers]
        assert len(gathers) == model.cfg.n_layers + (1 if kind == "vit" else 0)  # + final CLS gather
        for c in blocks:
            assert [nbytes for op, _, nbytes in c.ops if op == "send"] == [expect] * (n - 1)
        mt.assert_bytes_match(run)


def test_dct_final_gather_averages_cls_copies(mt, tiny_models, tmp_path):
    model = tiny_models["vit"]
    inp = model.make_input(T, batch=BATCH, seed=14)
    run = mt.run(model, "astra", 3, inp, T, codebook_path=exact_file(model, inp, 1, tmp_path))
    final = run.ranks[1].trace.collectives("all_gather")[-1]
    assert final.bytes_sent == 2 * BATCH * model.cfg.dim * 4  # one [B, D] fp32 CLS to each of 2 peers
    assert run.ranks[1].analytic["final"] == final.bytes_sent


@pytest.mark.parametrize("kind", ["vit", "gpt2"])
def test_kmeans_codebooks_top1_agreement_is_reported(mt, tiny_models, kind):
    model = tiny_models[kind]
    inp = model.make_input(T, batch=16, seed=15)
    run = mt.run(model, "astra", 4, inp, T, {"groups": 8, "codebook_size": 32})
    ref = mt.single(model, inp)
    agree = (run.output.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"\nastra {kind} G=8 K=32 (k-means) top-1 agreement with single: {agree:.3f}, "
          f"max abs err {(run.output - ref).abs().max().item():.3f}")
    assert 0.0 <= agree <= 1.0


def test_codebook_file_sets_groups_and_size_and_rejects_mismatch(mt, tiny_models, tmp_path):
    model = tiny_models["gpt2"]
    inp = model.make_input(T, seed=16)
    path = exact_file(model, inp, 2, tmp_path)  # G=2, K=16 (next power of two >= 11)
    run = mt.run(model, "astra", 2, inp, T, codebook_path=path)
    assert (run.ranks[0].method.groups, run.ranks[0].method.codebook_size) == (2, 16)
    with pytest.raises(ConfigError, match="codebook_size"):
        mt.run(model, "astra", 2, inp, T, {"codebook_size": 1024}, codebook_path=path)
    with pytest.raises(ConfigError, match="groups"):
        mt.run(model, "astra", 2, inp, T, {"groups": 4}, codebook_path=path)
    other = build_model("vit-tiny")  # D=64: the file's [L, 2, 16, 48] does not fit
    with pytest.raises(ConfigError, match="codebook_path"):
        mt.run(other, "astra", 2, other.make_input(T), T, codebook_path=path)


def test_build_time_codebook_fit_is_deterministic(mt, tiny_models):
    model = tiny_models["vit"]
    inp = model.make_input(T, seed=17)
    a = mt.run(model, "astra", 2, inp, T, {"codebook_size": 8})
    b = mt.run(model, "astra", 2, inp, T, {"codebook_size": 8})
    assert torch.equal(a.ranks[0].method.codebooks, a.ranks[1].method.codebooks)
    assert torch.equal(a.ranks[0].method.codebooks, b.ranks[0].method.codebooks)
    assert torch.equal(a.output, b.output)


def test_out_of_step_header_is_a_comm_error(mt, tiny_models):
    model = tiny_models["gpt2"]
    run = mt.run(model, "astra", 2, model.make_input(T), T, {"codebook_size": 8})
    m = run.ranks[0].method
    msg = m.encode(torch.randn(1, 5, model.cfg.dim), 0)
    with pytest.raises(CommError, match="header"):
        m.decode_kv(msg, 0, 1, 6)  # the peer sent 5 tokens, we expected 6
