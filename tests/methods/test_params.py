"""Bad parameters: one ConfigError naming the parameter and what is allowed."""

from __future__ import annotations

import pytest

from testbed.comm import InProcessGroup
from testbed.errors import ConfigError
from testbed.methods import METHODS, build_method
from testbed.models import build_model


def build(name, params=None, world_size=2, rank=0, tokens=11, model="vit-tiny", **kw):
    comm = InProcessGroup(world_size).communicator(rank)
    return build_method(name, build_model(model), params, rank, world_size, comm, tokens=tokens, **kw)


def raises(field, fn, *args, **kw):
    with pytest.raises(ConfigError) as e:
        fn(*args, **kw)
    assert e.value.field == field, str(e.value)
    assert "allowed" in str(e.value)
    return e.value


def test_methods_list():
    assert METHODS == ("single", "tensor_parallel", "sequence_parallel", "sequence_parallel_int8",
                       "block_parallel", "astra")


def test_unknown_method_and_model():
    err = raises("method", build, "pipeline")
    assert "astra" in err.allowed
    raises("model", build_model, "vit-huge")


@pytest.mark.parametrize("name", METHODS)
def test_unknown_param_key_is_rejected(name):
    err = raises("params", build, name, {"grups": 2})
    assert err.value == "grups"


def test_groups_not_dividing_hidden_size():
    err = raises("groups", build, "astra", {"groups": 3})  # D = 64
    assert "D=64" in err.allowed
    raises("groups", build, "astra", {"groups": 0})


@pytest.mark.parametrize("k", [1, 0, -4, 2.5])
def test_codebook_size_below_two(k):
    raises("codebook_size", build, "astra", {"codebook_size": k})


@pytest.mark.parametrize("name", ["tensor_parallel", "block_parallel"])
def test_heads_not_divisible_by_ranks(name):
    err = raises("world_size", build, name, world_size=3)  # 4 heads
    assert "n_heads=4" in err.allowed


@pytest.mark.parametrize("name", ["sequence_parallel", "sequence_parallel_int8", "astra"])
def test_more_ranks_than_tokens(name):
    raises("world_size", build, name, {"codebook_size": 4} if name == "astra" else None,
           world_size=5, tokens=4, model="gpt2-tiny")


def test_more_ranks_than_patches_with_distributed_class_tokens():
    raises("world_size", build, "astra", {"codebook_size": 4}, world_size=4, tokens=4)  # 3 patches
    build("astra", {"codebook_size": 4, "dct": False}, world_size=4, tokens=4)  # CLS is a token then


@pytest.mark.parametrize("n_b", [0, 3, "1", 1.0, True])
def test_bad_blocks_per_group(n_b):
    raises("n_b", build, "block_parallel", {"n_b": n_b})  # 2 blocks


def test_dct_needs_a_class_token():
    raises("dct", build, "astra", {"dct": True, "codebook_size": 4}, model="gpt2-tiny")
    raises("dct", build, "astra", {"dct": "yes", "codebook_size": 4})


def test_bad_lookup_tables_and_calibration_samples():
    raises("lookup_tables", build, "astra", {"lookup_tables": "sometimes", "codebook_size": 4})
    raises("calibration_samples", build, "astra", {"calibration_samples": 0, "codebook_size": 4})


def test_codebook_path_only_for_astra(tmp_path):
    raises("codebook_path", build, "sequence_parallel", codebook_path=str(tmp_path / "cb.pt"))
    raises("codebook_path", build, "astra", codebook_path=str(tmp_path / "missing.pt"))


def test_input_with_other_token_count_than_built_for():
    m = build("sequence_parallel", world_size=1, tokens=11)
    raises("tokens", m.forward, m.model.make_input(13))


@pytest.mark.parametrize("value", ["tree", None, 1, "RING"])
def test_bad_all_reduce_algorithm(value):
    err = raises("all_reduce", build, "tensor_parallel", {"all_reduce": value})
    assert err.allowed == "auto | ring | direct"
