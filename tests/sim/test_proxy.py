"""Profiles of a model too large to build, from a shallower proxy with the same blocks: the target keeps its
own stated collectives, and each compute segment comes from the proxy's segment at the same place in the
block pattern."""

from __future__ import annotations

import pytest

from testbed.comm.trace import Collective, Compute, Trace
from testbed.errors import ConfigError
from testbed.models.config import CONFIGS, get_config
from testbed.sim import proxy
from testbed.sim.extrapolate import segments
from testbed.sim.profiles import ComputeProfile, ProfileKey
from testbed.sim.synth import skeleton


@pytest.fixture
def deep(monkeypatch):
    """llama-tiny-12 (12 blocks) measured through llama-tiny-4 (4 blocks of the same shapes)."""
    monkeypatch.setitem(CONFIGS, "llama-tiny-12", get_config("llama-tiny", n_layers=12))
    monkeypatch.setitem(CONFIGS, "llama-tiny-4", get_config("llama-tiny", n_layers=4, vocab_size=64))
    monkeypatch.setitem(proxy.PROXIES, "llama-tiny-12", "llama-tiny-4")


def _proxy_profile(key: ProfileKey) -> ComputeProfile:
    """The proxy's stated schedule with a distinct duration per segment: 1000 * rank + segment index + 1."""
    sk = skeleton(key.model, key.method, key.params, key.tokens, key.nodes, key.batch)
    traces = []
    for r in range(key.nodes):
        events = []
        for j, c in enumerate(sk.collectives[r] + [None]):
            events.append(Compute(1000.0 * r + j + 1))
            if c is not None:
                events.append(Collective(c.kind, list(c.ops), serialize_s=0.5 + j))
        traces.append(Trace(r, events))
    return ComputeProfile(key, traces)


@pytest.mark.parametrize("method,params,period", [("sequence_parallel", {}, 1), ("astra", {"codebook_size": 16}, 1),
                                                  ("tensor_parallel", {}, 2), ("block_parallel", {"n_b": 4}, 1)])
def test_the_target_keeps_its_schedule_and_takes_the_proxys_segments_in_pattern(deep, method, params, period):
    key = ProfileKey.of("llama-tiny-12", method, params, tokens=13, nodes=2)
    pk = proxy.proxy_key(key)
    assert pk.model == "llama-tiny-4" and proxy.proxy_key(pk) is None
    prof = proxy.from_proxy(key, _proxy_profile(pk))
    assert prof.extrapolated and prof.basis == [pk]
    sk = skeleton("llama-tiny-12", method, params, 13, 2)
    for r, tr in enumerate(prof.traces):
        assert [(c.kind, c.ops) for c in tr.collectives()] == [(c.kind, c.ops) for c in sk.collectives[r]]
        got = [int(d) - 1000 * r - 1 for d in segments(tr)]  # the proxy segment each one came from
        n_p = len(skeleton("llama-tiny-4", method, params, 13, 2).collectives[r]) + 1
        assert got[0] == 0 and got[-1] == n_p - 1
        middle = got[1:-1]
        assert set(middle) <= set(range(n_p)) and len(middle) == len(sk.collectives[r]) - 1
        if n_p > 2:  # proxy middles cycled in order, whole periods: segment j and the one it maps to agree mod period
            assert all((m - j) % period == 0 for j, m in enumerate(middle, start=1))
            assert 0 not in middle and n_p - 1 not in middle
        else:  # one group of n_b blocks in the proxy: its first segment stands for every group
            assert set(middle) <= {0}


def test_single_is_the_proxys_forward_scaled_by_the_block_count(deep):
    key = ProfileKey.of("llama-tiny-12", "single", {}, tokens=13, nodes=1)
    prof = proxy.from_proxy(key, _proxy_profile(proxy.proxy_key(key)))
    assert segments(prof.traces[0]) == [1.0 * 12 / 4]


def test_segment_map_keeps_attention_on_attention():
    assert proxy.segment_map(9, 9, 2) == list(range(9))
    m = proxy.segment_map(65, 9, 2)  # 32 blocks of 2 all-reduces from a 4-block proxy
    assert m[0] == 0 and m[-1] == 8 and m[1:7] == [1, 2, 3, 4, 5, 6] and m[7:9] == [1, 2]
    assert proxy.segment_map(9, 2, 1) == [0] * 8 + [1]


def test_a_profile_of_another_job_is_refused(deep):
    key = ProfileKey.of("llama-tiny-12", "sequence_parallel", {}, tokens=13, nodes=2)
    other = _proxy_profile(ProfileKey.of("llama-tiny-4", "sequence_parallel", {}, tokens=12, nodes=2))
    with pytest.raises(ConfigError, match="proxy profile"):
        proxy.from_proxy(key, other)
