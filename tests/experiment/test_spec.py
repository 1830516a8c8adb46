"""The experiment schema: valid files parse to typed specs; every bad field gives one ConfigError at its YAML path."""

from __future__ import annotations

import pytest

from testbed.errors import ConfigError
from testbed.experiment.spec import LinkProfile, load_spec, parse_spec

from .helpers import tiny, write


def test_valid_file_parses_with_defaults_and_shorthands(tmp_path):
    spec = load_spec(write(tmp_path / "e.yaml", tiny()))
    assert spec.name == "tiny" and spec.model.name == "vit-tiny" and spec.input.tokens == 17
    assert [m.name for m in spec.methods][:2] == ["single", "tensor_parallel"]
    assert spec.methods[5].params == {"groups": 1, "codebook_size": 16}
    assert spec.methods[5].display == "astra G=1 K=16"
    assert spec.nodes.count == 2 and spec.nodes.threads == 1
    assert [c.profile for c in spec.cells()] == [LinkProfile()]  # no sweep: one unshaped cell


def test_grid_combines_every_axis_and_round_trips():
    spec = parse_spec(tiny(backend="mininet", nodes={"count": 4},
                           sweep={"bandwidth_mbps": [10, 100], "delay_ms": [0, 5], "loss_pct": [0, 1]}))
    cells = spec.cells()
    assert len(cells) == 8 and [c.index for c in cells] == list(range(8))
    assert {(c.profile.bandwidth_mbps, c.profile.delay_ms, c.profile.loss_pct) for c in cells} == {
        (b, d, p) for b in (10.0, 100.0) for d in (0.0, 5.0) for p in (0.0, 1.0)}
    assert parse_spec(spec.to_dict()) == spec


def test_listed_profiles_and_inline_trace_round_trip():
    spec = parse_spec(tiny(backend="mininet", sweep={
        "profiles": [{"bandwidth_mbps": 10, "delay_ms": 5}, {"bandwidth_mbps": 50}],
        "traces": [{"name": "drop", "points": [[0, 100], [2, 10]], "delay_ms": 1}]}))
    cells = spec.cells()
    assert [c.profile.bandwidth_mbps for c in cells] == [10, 50, None]
    assert cells[2].trace.points == ((0.0, 100.0), (2.0, 10.0)) and cells[2].profile.delay_ms == 1
    assert parse_spec(spec.to_dict()) == spec


@pytest.mark.parametrize("change, field, allowed", [
    ({"model": None}, "model", "mapping"),
    ({"input": {"tokens": "many"}}, "input.tokens", "an integer >= 1"),
    ({"input": {"tokens": 17.0}}, "input.tokens", "an integer"),
    ({"input": {"tokens": True}}, "input.tokens", "an integer"),
    ({"repetitions": 0}, "repetitions", ">= 1"),
    ({"backend": "docker"}, "backend", "inprocess | loopback | mininet | sim"),
    ({"nodes": {"count": 4, "cpus": 2}}, "nodes.cpus", "allowed fields: count, threads"),
    ({"colour": "red"}, "colour", "allowed fields: name"),
    ({"name": "a b"}, "name", "letters, digits"),
    ({"methods": []}, "methods", "a list of methods"),
    ({"methods": [{"name": "astra", "params": {"groups": 1}, "group": 2}]}, "methods[0].group", "allowed fields"),
    ({"methods": ["single", {"name": "single"}]}, "methods[1]", "each method and params once"),
    ({"backend": "mininet", "sweep": {"bandwidth_mbps": [10, -5]}}, "sweep.bandwidth_mbps[1]", "a number in (0"),
    ({"backend": "mininet", "sweep": {"bandwidth_mbps": "fast"}}, "sweep.bandwidth_mbps[0]", "a number in (0"),
    ({"backend": "mininet", "sweep": {"loss_pct": [100]}}, "sweep.loss_pct[0]", "[0, 100)"),
    ({"backend": "mininet", "sweep": {"delay_ms": [0], "jitter_ms": [5]}}, "sweep.jitter_ms", "<= delay_ms"),
    ({"backend": "mininet", "sweep": {"profiles": [{"bandwidth_mbps": 10, "delay": 5}]}},
     "sweep.profiles[0].delay", "allowed fields"),
    ({"backend": "mininet", "sweep": {"profiles": [{"bandwidth_mbps": 0}]}}, "sweep.profiles[0].bandwidth_mbps",
     "(0, 10000]"),
    ({"backend": "mininet", "sweep": {"traces": [{"name": "t", "points": [[0, 10], [0, 20]]}]}},
     "sweep.traces[0].points[1][0]", "after the previous point"),
    ({"sweep": {"bandwidth_mbps": [10]}}, "sweep.bandwidth_mbps", "null/0 only with backend inprocess"),
    ({"backend": "loopback", "sweep": {"delay_ms": [5]}}, "sweep.delay_ms", "null/0 only with backend loopback"),
    ({"nodes": {"count": 2, "cpu_share": 0.5}}, "nodes.cpu_share", "`nodes.device.speed` instead"),
    ({"nodes": {"count": 2, "device": {"speed": 0.5}}}, "nodes.device.speed", "only mininet and sim"),
    ({"backend": "mininet", "nodes": {"count": 4, "device": {"speed": 0}}}, "nodes.device.speed", "a number in (0"),
    ({"backend": "mininet", "nodes": {"count": 4, "device": {"speed": -1}}}, "nodes.device.speed", "a number in (0"),
    ({"backend": "mininet", "nodes": {"count": 4, "device": {"speed": "fast"}}}, "nodes.device.speed", "a number"),
    ({"backend": "mininet", "nodes": {"count": 4, "device": {"cores": 2}}}, "nodes.device.cores", "allowed fields"),
    ({"backend": "mininet", "emulation": {"time_dilation": 0.5}}, "emulation.time_dilation", "auto, or a number in [1"),
    ({"backend": "mininet", "emulation": {"time_dilation": 0}}, "emulation.time_dilation", "auto, or a number in [1"),
    ({"backend": "mininet", "emulation": {"time_dilation": "fast"}}, "emulation.time_dilation", "auto, or a number"),
    ({"backend": "mininet", "emulation": {"time_dilation": True}}, "emulation.time_dilation", "auto, or a number"),
    ({"backend": "mininet", "emulation": {"time_dilation": 5000}}, "emulation.time_dilation", "[1, 1000]"),
    ({"backend": "mininet", "emulation": {"dilation": 2}}, "emulation.dilation", "allowed fields: time_dilation"),
    ({"emulation": {"time_dilation": 2}}, "emulation.time_dilation", "auto or 1 with backend inprocess"),
    ({"backend": "sim", "sweep": {"traces": [{"name": "t", "points": [[0, 10]]}]}}, "sweep.traces", "backend sim"),
])
def test_bad_fields_name_their_yaml_path(change, field, allowed):
    with pytest.raises(ConfigError) as e:
        parse_spec(tiny(**change))
    assert e.value.field == field, str(e.value)
    assert allowed in e.value.allowed, str(e.value)


def test_missing_field_is_named():
    d = tiny()
    del d["methods"]
    with pytest.raises(ConfigError, match=r"^methods: got None; allowed: this field is required"):
        parse_spec(d)


def test_unreadable_yaml_says_where(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_spec(write(tmp_path / "bad.yaml", "name: x\nmethods: [single\n"))
    assert e.value.allowed == "valid YAML" and "line" in str(e.value.value)


def test_missing_weights_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_spec(tiny(model={"name": "vit-tiny", "weights_path": str(tmp_path / "nope.safetensors")}))
    assert e.value.field == "model.weights_path"
