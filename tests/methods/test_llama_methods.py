"""Every method on the Llama family against single: GQA (KV heads split or replicated), MQA with
Qwen2's q/k/v biases, rotary positions, T not divisible by N; bytes equal the stated schedule."""

from __future__ import annotations

import pytest
import torch

from testbed.errors import ConfigError
from testbed.methods import comm_schedule, decoupled_reference
from testbed.methods import vq
from testbed.methods.astra import message_bytes

T = 11
BATCH = 2
KINDS = ["llama", "llama-mqa"]
WORLDS = [2, 3, 4]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["tensor_parallel", "sequence_parallel"])
@pytest.mark.parametrize("n", WORLDS)
def test_exact_methods_equal_single(mt, tiny_models, kind, name, n):
    model = tiny_models[kind]
    inp = model.make_input(T, batch=BATCH, seed=3)
    run = mt.run(model, name, n, inp, T)
    torch.testing.assert_close(run.output, mt.single(model, inp), rtol=1e-5, atol=1e-5)
    assert run.output_rank == (n - 1 if name == "sequence_parallel" else 0)
    mt.assert_bytes_match(run)


@pytest.mark.parametrize("n,kv_heads", [(2, (3, 3)), (3, (2, 2)), (4, (2, 2))])
def test_tensor_parallel_splits_kv_heads_where_n_divides_them(mt, tiny_models, n, kv_heads):
    """6 KV heads, 12 query heads: N=2, 3 split them; N=4 (3 query heads per rank) holds the 2 KV
    heads its queries read, one of them also held by a neighbour (replicated)."""
    run = mt.run(tiny_models["llama"], "tensor_parallel", n, tiny_models["llama"].make_input(T), T)
    held = [rr.method.shards[0].kv_heads for rr in run.ranks]
    assert [b - a for a, b in held] == [kv_heads[0]] * n
    starts = [a for a, _ in held]
    assert (len(set(starts)) == n and sorted({h for a, b in held for h in range(a, b)}) == list(range(6)))
    assert (sum(b - a for a, b in held) == 6) == (6 % n == 0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", WORLDS)
def test_sequence_parallel_int8_is_close_to_single(mt, tiny_models, kind, n):
    model = tiny_models[kind]
    inp = model.make_input(T, batch=BATCH, seed=4)
    run, ref = mt.run(model, "sequence_parallel_int8", n, inp, T), mt.single(model, inp)
    err = (run.output - ref).abs().max().item()
    assert 0 < err < 0.02 * ref.abs().max().item()
    mt.assert_bytes_match(run)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", WORLDS)
@pytest.mark.parametrize("groups", [1, 4])
def test_astra_with_exact_codebooks_equals_single(mt, tiny_models, tmp_path, kind, n, groups):
    model = tiny_models[kind]
    inp = model.make_input(T, batch=BATCH, seed=11)
    path = tmp_path / "exact.pt"
    vq.save_codebooks(path, vq.exact_codebooks(model, inp, groups), {"kind": "exact"})
    run = mt.run(model, "astra", n, inp, T, codebook_path=str(path))
    torch.testing.assert_close(run.output, mt.single(model, inp), rtol=1e-5, atol=1e-5)
    assert run.output_rank == n - 1
    mt.assert_bytes_match(run)
    K = run.ranks[0].method.codebook_size
    sizes = [(T // n + (r < T % n)) * BATCH for r in range(n)]
    assert run.ranks[0].analytic["per_block"] == [message_bytes(sizes[0], groups, vq.code_bits(K)) * (n - 1)] * 2


@pytest.mark.parametrize("kind", KINDS)
def test_astra_lookup_tables_equal_the_direct_path(mt, tiny_models, kind):
    model = tiny_models[kind]
    inp = model.make_input(T, batch=BATCH, seed=12)
    params = {"groups": 4, "codebook_size": 16}
    direct = mt.run(model, "astra", 3, inp, T, {**params, "lookup_tables": False})
    tables = mt.run(model, "astra", 3, inp, T, {**params, "lookup_tables": True})
    torch.testing.assert_close(tables.output, direct.output, rtol=1e-5, atol=1e-5)
    assert (direct.output - mt.single(model, inp)).abs().max() > 1e-3


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("n_b", [1, 2])
def test_block_parallel_equals_its_decoupled_reference(mt, tiny_models, n, n_b):
    model = tiny_models["llama"]
    inp = model.make_input(T, batch=BATCH, seed=6)
    run = mt.run(model, "block_parallel", n, inp, T, {"n_b": n_b})
    torch.testing.assert_close(run.output, decoupled_reference(model, n, n_b)(inp), rtol=1e-5, atol=1e-5)
    mt.assert_bytes_match(run)


def test_block_parallel_needs_n_to_divide_the_kv_heads(tiny_models):
    with pytest.raises(ConfigError, match="n_kv_heads=6"):
        comm_schedule("block_parallel", tiny_models["llama"].cfg, T, 4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["tensor_parallel", "sequence_parallel", "sequence_parallel_int8",
                                  "block_parallel", "astra"])
def test_one_rank_is_exactly_single(mt, tiny_models, kind, name):
    model = tiny_models[kind]
    inp = model.make_input(T, batch=BATCH, seed=5)
    params = {"codebook_size": 4} if name == "astra" else None
    run = mt.run(model, name, 1, inp, T, params)
    assert torch.equal(run.output, mt.single(model, inp))


def test_stated_bytes_of_gqa_models(tiny_models):
    """Stated per-rank bytes per block: TP 2 ring all-reduces of [B, T, D] whatever the KV heads; SP
    the D-wide h of its chunk to each peer (not K/V: with GQA 2*kv_dim may be smaller than D)."""
    cfg = tiny_models["llama"].cfg
    tp = comm_schedule("tensor_parallel", cfg, 12, 4, batch=1)
    assert tp.sent(0)[:2] == [2 * 3 * 12 * 96 * 4 // 4] * 2
    sp = comm_schedule("sequence_parallel", cfg, 12, 4, batch=1)
    assert sp.sent(0) == [3 * 96 * 4 * 3] * cfg.n_layers
