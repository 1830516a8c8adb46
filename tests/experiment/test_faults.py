"""Scheduled faults in the experiment file: valid events parse and round-trip; every bad entry is one
ConfigError naming its field; a backend that cannot inject a kind refuses it before anything runs."""

from __future__ import annotations

import pytest

from testbed.errors import ConfigError
from testbed.experiment.checks import check_spec
from testbed.experiment.spec import parse_spec

from .helpers import tiny

DOWN = {"kind": "link_down", "link": ["h2", "s1"], "at_s": 1, "duration_s": 2}


def spec(*faults, **over):
    return parse_spec(tiny(**{"backend": "mininet", "nodes": {"count": 4}, "methods": ["single"], **over,
                              "faults": list(faults)}))


def test_events_parse_with_default_names_and_round_trip():
    s = spec(DOWN, {"kind": "link_profile", "link": ["s1", "h1"], "at_s": 0.5, "profile": {"bandwidth_mbps": 5}},
             {"kind": "node_kill", "host": "h3", "at_s": 4, "name": "crash"})
    assert [f.name for f in s.faults] == ["link_down:h2-s1@1s", "link_profile:s1-h1@0.5s", "crash"]
    assert s.faults[0].duration_s == 2 and s.faults[1].duration_s is None
    assert s.faults[1].profile == (("bandwidth_mbps", 5.0),)
    assert parse_spec(s.to_dict()) == s
    assert "faults" not in spec().to_dict()  # none: the stored config is as before


@pytest.mark.parametrize("event, field, allowed", [
    ({**DOWN, "kind": "flood"}, "faults[0].kind", "link_down | link_profile | node_kill"),
    ({**DOWN, "at_s": -1}, "faults[0].at_s", "[0, 86400]"),
    ({k: v for k, v in DOWN.items() if k != "at_s"}, "faults[0].at_s", "required"),
    ({k: v for k, v in DOWN.items() if k != "duration_s"}, "faults[0].duration_s", "required for kind link_down"),
    ({**DOWN, "duration_s": 0}, "faults[0].duration_s", "(0, 86400]"),
    ({**DOWN, "link": "h2-s1"}, "faults[0].link", "the two ends of a topology link"),
    ({**DOWN, "host": "h2"}, "faults[0].host", "no such field for kind link_down"),
    ({**DOWN, "when": 3}, "faults[0].when", "allowed fields"),
    ({"kind": "node_kill", "at_s": 1}, "faults[0].host", "required for kind node_kill"),
    ({"kind": "link_profile", "link": ["h1", "s1"], "at_s": 1, "profile": {"loss_pct": 100}},
     "faults[0].profile.loss_pct", "[0, 100)"),
    ({"kind": "link_profile", "link": ["h1", "s1"], "at_s": 1, "profile": {"mtu": 1}},
     "faults[0].profile.mtu", "allowed fields"),
    ({"kind": "link_profile", "link": ["h1", "s1"], "at_s": 1, "profile": {}}, "faults[0].profile", "at least one"),
])
def test_bad_events_name_their_field(event, field, allowed):
    with pytest.raises(ConfigError) as e:
        spec(event)
    assert e.value.field == field and allowed in e.value.allowed, str(e.value)


def test_duplicate_names_are_refused():
    with pytest.raises(ConfigError) as e:
        spec(DOWN, {**DOWN, "at_s": 1.0})  # the same default name
    assert e.value.field == "faults[1].name" and "faults[0]" in e.value.allowed


@pytest.mark.parametrize("over, event, field, allowed", [
    ({}, {**DOWN, "link": ["h2", "h3"]}, "faults[0].link", "a link of topology 'star': [h1, s1]"),
    ({}, {**DOWN, "link": ["h9", "s1"]}, "faults[0].link", "[h4, s1]"),
    ({"backend": "loopback", "nodes": {"count": 2}}, {"kind": "node_kill", "host": "h3", "at_s": 1},
     "faults[0].host", "a host that runs a node: h1 | h2"),
    ({"backend": "loopback", "nodes": {"count": 2}}, DOWN, "faults[0].kind",
     "node_kill with backend loopback (link_down needs backend mininet)"),
    ({"backend": "inprocess", "nodes": {"count": 2}}, {"kind": "node_kill", "host": "h1", "at_s": 1},
     "faults[0].kind", "no fault with backend inprocess (node_kill needs backend loopback or mininet)"),
    ({"backend": "sim"}, DOWN, "faults[0].kind", "no fault with backend sim"),
    ({"sweep": {"traces": [{"name": "t", "points": [[0, 10], [1, 5]]}]}},
     {"kind": "link_profile", "link": ["h1", "s1"], "at_s": 1, "profile": {"delay_ms": 5}},
     "faults[0].kind", "a trace sets every link's profile"),
])
def test_events_are_checked_against_topology_and_backend(over, event, field, allowed):
    with pytest.raises(ConfigError) as e:
        check_spec(spec(event, **over))
    assert e.value.field == field and allowed in e.value.allowed, str(e.value)


def test_a_killed_node_fails_the_repetition_it_hits_and_the_next_unit_gets_fresh_nodes(tmp_path):
    import json

    from testbed.experiment.cli import run_main
    from testbed.experiment.store import read_rows

    from .helpers import write

    kill = {"kind": "node_kill", "host": "h2", "at_s": 0.3, "name": "crash"}
    data = tiny(backend="loopback", methods=["tensor_parallel", "sequence_parallel"], repetitions=400, warmup=1,
                timeout_s=30, faults=[kill])
    out = tmp_path / "out"
    assert run_main([str(write(tmp_path / "e.yaml", data)), "--out", str(out), "--quiet", "--no-plots"]) == 1
    rows = read_rows(out)
    assert len(rows) == 800
    for _, unit in rows.groupby("cell"):  # each unit meets the kill: one failed repetition, the rest skipped
        failed = unit[unit["status"] == "error"]
        first = failed.iloc[0]
        assert first["faults"] == "crash" and first["fault_time_s"] < 0.8  # it started before the kill fired
        assert not first["error"].startswith("skipped") and failed["error"].iloc[1:].str.startswith("skipped").all()
        ok = unit[unit["status"] == "ok"]
        # a repetition that ends in the instant the node dies is ok, and names the kill too
        assert len(ok) >= 1 and (ok["faults"].iloc[:-1] == "").all() and (ok["fault_time_s"] < 0.3).all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"]["starts"] == 2  # the second unit ran on fresh nodes
    assert [[e["name"] for e in u["events"]] for u in manifest["faults"]] == [["crash"], ["crash"]]
    assert all(0.3 <= u["events"][0]["fired_at_s"] < 0.8 for u in manifest["faults"])
