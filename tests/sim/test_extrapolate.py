"""The extrapolation model recovers known coefficients and marks what it made."""

from __future__ import annotations

import numpy as np
import pytest

from testbed.comm.trace import Collective, Compute, Trace
from testbed.errors import ConfigError
from testbed.sim.extrapolate import extrapolate, features, nnls, segments
from testbed.sim.profiles import ComputeProfile, ProfileKey
from testbed.sim.synth import skeleton

COEF = {False: [1e-4, 2e-5, 1e-6, 3e-8], True: [5e-4, 2e-5, 1e-6, 3e-8]}  # output rank pays a head


def synthetic_profile(method: str, tokens: int, nodes: int, params=None) -> ComputeProfile:
    """A 'measured' profile whose compute follows the model exactly (known coefficients)."""
    params = params or {}
    sk = skeleton("vit-tiny", method, params, tokens, nodes)
    traces = []
    for r in range(nodes):
        shape = sk.shapes[r]
        d = float(np.dot(COEF[shape.is_output], features(method, shape, tokens, nodes)))
        events = []
        for c in sk.collectives[r]:
            events += [Compute(d), Collective(c.kind, list(c.ops), serialize_s=1e-5 * len(c.ops))]
        events.append(Compute(d))
        traces.append(Trace(r, events))
    return ComputeProfile(ProfileKey.of("vit-tiny", method, params, tokens, nodes), traces)


def test_nnls_keeps_coefficients_non_negative():
    x = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]])
    assert nnls(x, np.array([1.0, 3.0, 5.0])) == pytest.approx([1.0, 2.0])
    assert nnls(x, np.array([5.0, 3.0, 1.0]))[1] == 0.0  # a falling line: slope clipped at 0


@pytest.mark.parametrize("method", ["sequence_parallel", "astra", "tensor_parallel"])
def test_extrapolation_recovers_the_generating_model(method):
    measured = [synthetic_profile(method, t, n) for t in (17, 33, 65) for n in (2, 4)]
    key = ProfileKey.of("vit-tiny", method, {}, 1025, 4)
    prof = extrapolate(key, measured)
    truth = synthetic_profile(method, 1025, 4)
    assert prof.extrapolated and set(prof.basis) == {p.key for p in measured}
    for got, want in zip(prof.traces, truth.traces):
        assert segments(got) == pytest.approx(segments(want), rel=1e-6)
        assert [(c.kind, c.ops) for c in got.collectives()] == [(c.kind, c.ops) for c in want.collectives()]
        assert [c.serialize_s for c in got.collectives()] == pytest.approx(
            [c.serialize_s for c in want.collectives()], rel=1e-6)
    assert "fit" in prof.meta


def test_extrapolation_needs_two_points_of_the_same_family():
    one = [synthetic_profile("sequence_parallel", 17, 2)]
    with pytest.raises(ConfigError, match="testbed calibrate"):
        extrapolate(ProfileKey.of("vit-tiny", "sequence_parallel", {}, 999, 4), one)
    other = [synthetic_profile("astra", t, 2) for t in (17, 33)]
    with pytest.raises(ConfigError):
        extrapolate(ProfileKey.of("vit-tiny", "sequence_parallel", {}, 999, 4), other)


def test_schedule_checks_what_the_methods_check():
    with pytest.raises(ConfigError, match="n_heads"):
        skeleton("vit-tiny", "tensor_parallel", {}, 65, 3)
    with pytest.raises(ConfigError) as e:
        skeleton("vit-tiny", "astra", {"groups": 3}, 65, 2)
    assert e.value.field == "groups"
    with pytest.raises(ConfigError) as e:
        skeleton("vit-tiny", "block_parallel", {"bogus": 1}, 65, 2)
    assert e.value.field == "params"
    with pytest.raises(ConfigError) as e:
        skeleton("gpt2-small", "single", {}, 8192, 1)
    assert e.value.field == "tokens"
    with pytest.raises(ConfigError) as e:
        skeleton("vit-tiny", "magic", {}, 65, 2)
    assert e.value.field == "method"
