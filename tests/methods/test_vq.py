"""Vector quantization: nearest-code search, bit packing, k-means, codebooks from a model, files."""

from __future__ import annotations

import math

import pytest
import torch

from testbed.errors import ConfigError
from testbed.methods import vq
from testbed.models import build_model


def test_quantize_is_the_nearest_entry_per_group():
    g = torch.Generator().manual_seed(0)
    cb = torch.randn(4, 300, 16, generator=g)  # G=4, K=300, D/G=16
    h = torch.randn(3, 50, 64, generator=g)
    codes = vq.quantize(h, cb)
    assert codes.shape == (3, 50, 4) and codes.dtype == torch.int64
    brute = torch.cdist(h.reshape(-1, 4, 16).transpose(0, 1), cb).argmin(-1).transpose(0, 1).reshape(3, 50, 4)
    assert torch.equal(codes, brute)
    h_hat = vq.dequantize(codes, cb)
    assert h_hat.shape == h.shape
    assert torch.equal(h_hat[0, 0, 16:32], cb[1, codes[0, 0, 1]])


@pytest.mark.parametrize("name, groups", [("vit-tiny", 1), ("gpt2-tiny", 1), ("vit-small", 2)])
def test_fast_search_agrees_with_the_exact_one_on_real_activations(name, groups):
    """The int8 first pass + exact re-ranking picks the exact code for at least SEARCH_AGREEMENT of
    the tokens of every block (codebooks fit to one input, tested on another); where it does not,
    the entry it picks is as near within 1%."""
    model = build_model(name, seed=0)
    T = 65 if name.startswith("vit") else 64
    cbs = vq.fit_codebooks(model, groups, 256, T, seed=0, n_samples=2, iters=4)
    hs = vq.block_inputs(model, model.make_input(T, batch=2, seed=5))
    for cb, h in zip(cbs, hs):
        fast, exact = vq.Quantizer(cb), vq.Quantizer(cb, exact=True)
        assert fast.fast and not exact.fast
        got, want = fast(h), exact(h)
        assert (got == want).float().mean().item() >= vq.SEARCH_AGREEMENT
        x = h.reshape(-1, groups, cb.shape[-1])
        dist = lambda codes: ((x - vq.dequantize(codes, cb).reshape(x.shape)) ** 2).sum(-1)  # noqa: E731
        assert (dist(got.reshape(-1, groups)) <= dist(want.reshape(-1, groups)) * 1.01 + 1e-6).all()


def test_fast_search_is_used_only_where_it_pays():
    assert vq.Quantizer(torch.randn(1, 1024, 64)).fast and vq.Quantizer(torch.randn(2, 300, 64)).fast
    assert not vq.Quantizer(torch.randn(32, 1024, 24)).fast  # narrow groups
    assert not vq.Quantizer(torch.randn(1, 64, 64)).fast  # small codebooks
    assert not vq.Quantizer(torch.randn(1, 1024, 64), exact=True).fast


def test_fast_search_finds_exact_matches_and_the_exhaustive_search_on_separated_data():
    g = torch.Generator().manual_seed(3)
    cb = torch.randn(2, 500, 64, generator=g)
    q = vq.Quantizer(cb)
    codes = torch.randint(0, 500, (300, 2), generator=g)
    h = vq.dequantize(codes, cb)  # every token is an entry: distance 0 is the unique nearest
    assert q.fast and torch.equal(q(h), codes)
    far = h + 0.05 * torch.randn(h.shape, generator=g)
    assert torch.equal(q(far), vq.Quantizer(cb, exact=True)(far))


def test_quantize_slices_large_inputs_the_same_way(monkeypatch):
    g = torch.Generator().manual_seed(1)
    cb, h = torch.randn(2, 64, 8, generator=g), torch.randn(500, 16, generator=g)
    whole = vq.quantize(h, cb)
    monkeypatch.setattr(vq, "_MAX_DIST_ELEMS", 1000)  # force many slices
    assert torch.equal(vq.quantize(h, cb), whole)


@pytest.mark.parametrize("bits", [1, 2, 3, 7, 8, 10, 13, 20])
@pytest.mark.parametrize("n,groups", [(1, 1), (37, 3), (64, 8)])
def test_pack_unpack_round_trip_and_size(bits, n, groups):
    codes = torch.randint(0, 2 ** bits, (n, groups), generator=torch.Generator().manual_seed(bits))
    buf = vq.pack_codes(codes, bits)
    assert buf.dtype == torch.uint8 and buf.numel() == math.ceil(n * groups * bits / 8)
    assert torch.equal(vq.unpack_codes(buf, n, groups, bits), codes)


def test_packing_is_lsb_first():
    # codes 1, 2, 3 at 2 bits: 01 | 10<<2 | 11<<4 = 0b111001 = 57
    assert vq.pack_codes(torch.tensor([[1], [2], [3]]), 2).tolist() == [57]
    # 10 bits: 1023 then 1 -> 0xFF, 0b00000111, 0
    assert vq.pack_codes(torch.tensor([[1023, 1]]), 10).tolist() == [255, 7, 0]


def test_code_bits():
    assert [vq.code_bits(k) for k in (2, 3, 4, 5, 1024, 1025)] == [1, 2, 2, 3, 10, 11]
    with pytest.raises(ConfigError, match="codebook_size"):
        vq.code_bits(1)


def test_kmeans_finds_separated_clusters_and_is_deterministic():
    g = torch.Generator().manual_seed(2)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(200, 2, generator=g) for c in centres])
    c = vq.kmeans(x, 3, seed=5)
    assert torch.equal(c, vq.kmeans(x, 3, seed=5))
    found = sorted(c.round().tolist())
    assert found == sorted(centres.tolist())
    means = torch.stack([x[i * 200:(i + 1) * 200].mean(0) for i in range(3)])
    assert torch.cdist(means, c).min(1).values.max() < 1e-5  # Lloyd converged to the cluster means


def test_kmeans_with_fewer_points_than_entries_keeps_every_point():
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(3))
    c = vq.kmeans(x, 8, seed=1)
    assert c.shape == (8, 3) and torch.equal(c[:5], x)
    assert torch.equal(c, vq.kmeans(x, 8, seed=1))
    # spare entries are jittered copies (1e-3 std): a point may map to its copy, never farther
    torch.testing.assert_close(vq.dequantize(vq.quantize(x, c[None]), c[None]), x, rtol=0, atol=1e-2)
    assert (c[5:] - x[:3]).abs().max() > 0


def test_kmeans_of_identical_points():
    c = vq.kmeans(torch.ones(50, 4), 4)
    assert torch.allclose(c, torch.ones(4, 4))


@pytest.mark.parametrize("name", ["vit-tiny", "gpt2-tiny"])
def test_exact_codebooks_are_lossless_for_their_input(name):
    model = build_model(name)
    inp = model.make_input(9, batch=2, seed=4)
    cbs = vq.exact_codebooks(model, inp, groups=4)
    assert cbs.shape == (model.cfg.n_layers, 4, 32, model.cfg.dim // 4)  # 18 vectors -> K = 32
    hs = vq.block_inputs(model, inp)
    for l, h in enumerate(hs):
        assert torch.equal(vq.dequantize(vq.quantize(h, cbs[l]), cbs[l]), h)


def test_block_inputs_are_the_single_device_ln1_outputs():
    model = build_model("gpt2-tiny")
    inp = model.make_input(7)
    h0 = vq.block_inputs(model, inp)[0]
    torch.testing.assert_close(h0, model.blocks[0].ln1(model.embed(inp)))


def test_fit_codebooks_shape_and_determinism():
    model = build_model("vit-tiny")
    a = vq.fit_codebooks(model, groups=2, codebook_size=16, tokens=17, seed=0, n_samples=2)
    assert a.shape == (model.cfg.n_layers, 2, 16, model.cfg.dim // 2) and a.dtype == torch.float32
    assert torch.equal(a, vq.fit_codebooks(model, groups=2, codebook_size=16, tokens=17, seed=0, n_samples=2))
    assert not torch.equal(a, vq.fit_codebooks(model, groups=2, codebook_size=16, tokens=17, seed=1, n_samples=2))


def test_bad_groups_is_a_config_error():
    with pytest.raises(ConfigError, match="groups"):
        vq.exact_codebooks(build_model("vit-tiny"), torch.zeros(1, 3, 8, 8), groups=3)


def test_save_load_round_trip_and_bad_files(tmp_path):
    cbs = torch.randn(2, 4, 8, 16)
    vq.save_codebooks(tmp_path / "cb.pt", cbs, {"groups": 4, "note": "x"})
    got, meta = vq.load_codebooks(tmp_path / "cb.pt")
    assert torch.equal(got, cbs) and meta == {"groups": 4, "note": "x"}
    with pytest.raises(ConfigError, match="codebook_path"):
        vq.load_codebooks(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="codebook_path"):
        vq.load_codebooks(tmp_path / "junk.pt")
    torch.save({"codebooks": cbs}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="codebook_path"):
        vq.load_codebooks(tmp_path / "other.pt")
