"""The JSON Schemas (testbed schema) agree with the validating code on committed and bad files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest

from testbed.errors import ConfigError
from testbed.experiment.schema import COMMITTED, KINDS, MODELINE, runner_checks, schema, to_json
from testbed.yamlfile import read_yaml
from tests.experiment.helpers import tiny

ROOT = Path(__file__).resolve().parents[2]
FILES = {"experiment": sorted((ROOT / "experiments").glob("*.yaml")),
         "topology": sorted((ROOT / "topologies").glob("*.yaml"))}
PROBE = "no_such_field"


def _validator(kind: str) -> jsonschema.Draft7Validator:
    s = schema(kind)
    jsonschema.Draft7Validator.check_schema(s)
    return jsonschema.Draft7Validator(s)


def _runner_error(kind: str, data) -> ConfigError | None:
    try:
        runner_checks(kind, data)
    except ConfigError as e:
        return e
    return None


def _full() -> dict:
    """An experiment using every section: inline topology, traces, faults, emulation, device."""
    topo = {"name": "two", "description": "two hosts", "hosts": ["h1", {"name": "h2", "device": {"speed": 0.5}}],
            "switches": [{"name": "s1", "medium": {"bandwidth_mbps": 50}, "sweep": "fixed"}],
            "links": [{"a": "h1", "b": "s1", "profile": {"delay_ms": 1}, "sweep": "half"},
                      {"a": "h2", "b": "s1", "a_to_b": {"bandwidth_mbps": 10}, "b_to_a": {"loss_pct": 1}}]}
    return tiny(backend="mininet", model={"name": "vit-tiny", "weights_path": None},
                nodes={"count": 2, "threads": 1, "device": {"speed": 1.0}, "memory_mb": 256}, topology=topo,
                sweep={"bandwidth_mbps": [10, None], "delay_ms": 1, "jitter_ms": [0, 0.5], "loss_pct": [0],
                       "traces": [{"name": "lte", "points": [[0, 10], [1.5, 2]], "delay_ms": 2, "loop": False}]},
                emulation={"time_dilation": "auto", "reserve_cores": 0.5, "cpu_slice_ms": 10, "pace_compute": False,
                           "network_core": False},
                faults=[{"kind": "link_profile", "link": ["h1", "s1"], "at_s": 0.5, "profile": {"loss_pct": 5}},
                        {"kind": "node_kill", "host": "h2", "at_s": 1, "name": "kill"}],
                description="every section", output_dir=None, fidelity_s=0)


def test_committed_schemas_are_the_generated_ones():
    for kind in KINDS:
        path = ROOT / COMMITTED[kind]
        assert path.read_text() == to_json(kind), f"regenerate: testbed schema {kind} > {COMMITTED[kind]}"
        assert json.loads(path.read_text())["$schema"].startswith("http://json-schema.org/draft-07")


@pytest.mark.parametrize("kind", KINDS)
def test_every_committed_file_names_its_schema_and_passes_both(kind):
    v = _validator(kind)
    assert FILES[kind]
    for f in FILES[kind]:
        assert f.read_text().splitlines()[0] == MODELINE[kind], f"{f.name}: first line must be the schema line"
        data = read_yaml(f)
        assert [e.message for e in v.iter_errors(data)] == [], f.name
        assert _runner_error(kind, data) is None, f.name


GOOD = {
    "shorthands": lambda d: d.update(model="vit-tiny", nodes=2, methods=["single", "astra"]),
    "profiles": lambda d: d.update(sweep={"profiles": [{"bandwidth_mbps": None}, {"delay_ms": 0, "queue_packets": 8}]},
                                   backend="sim"),
    "full": lambda d: d.update(_full()),
    "null sections": lambda d: d.update(sweep=None, faults=None, emulation=None, description=None),
    "number forms": lambda d: d.update(timeout_s=1e3, fidelity_s=1, emulation={"time_dilation": 1}),
    "devices inline": lambda d: (d.pop("topology"), d.update(backend="devices", devices=_inventory())),
    "devices with mesh": lambda d: d.update(backend="devices", topology="mesh", devices=_inventory(
        connect_timeout_s=2)),
}


def _inventory(**over) -> dict:
    return {"nodes": [{"name": "pi1", "address": "192.168.1.20:50051", "device": {"speed": 1.0}},
                      {"name": "pi-2", "address": "[fe80::2]:50051"}], **over}



BAD = {
    "unknown top-level field": lambda d: d.update(colour="red"),
    "name missing": lambda d: d.pop("name"),
    "name with a space": lambda d: d.update(name="a b"),
    "tokens zero": lambda d: d["input"].update(tokens=0),
    "tokens a string": lambda d: d["input"].update(tokens="17"),
    "no methods": lambda d: d.update(methods=[]),
    "unknown method": lambda d: d.update(methods=["single", {"name": "pipeline"}]),
    "unknown param": lambda d: d.update(methods=[{"name": "astra", "params": {"bits": 4}}]),
    "param of another method": lambda d: d.update(methods=[{"name": "single", "params": {"n_b": 1}}]),
    "nodes zero": lambda d: d.update(nodes={"count": 0}),
    "nodes 65": lambda d: d.update(nodes=65),
    "cpu_share": lambda d: d.update(nodes={"count": 2, "cpu_share": 0.5}),
    "backend unknown": lambda d: d.update(backend="docker"),
    "repetitions zero": lambda d: d.update(repetitions=0),
    "warmup negative": lambda d: d.update(warmup=-1),
    "timeout zero": lambda d: d.update(timeout_s=0),
    "fidelity half a second": lambda d: d.update(fidelity_s=0.5),
    "dilation below one": lambda d: d.update(emulation={"time_dilation": 0.5}),
    "dilation a word": lambda d: d.update(emulation={"time_dilation": "fast"}),
    "bandwidth zero": lambda d: d.update(backend="sim", sweep={"bandwidth_mbps": [0]}),
    "loss 100": lambda d: d.update(backend="sim", sweep={"loss_pct": [100]}),
    "negative delay": lambda d: d.update(backend="sim", sweep={"delay_ms": [-1]}),
    "profiles and axes": lambda d: d.update(backend="sim", sweep={"profiles": [{}], "delay_ms": [1]}),
    "queue of one": lambda d: d.update(backend="sim", sweep={"profiles": [{"queue_packets": 1}]}),
    "trace with points and path": lambda d: d.update(backend="mininet", sweep={"traces": [
        {"name": "t", "points": [[0, 1]], "path": "x.csv"}]}),
    "trace with neither": lambda d: d.update(backend="mininet", sweep={"traces": [{"name": "t"}]}),
    "fault kind unknown": lambda d: d.update(faults=[{"kind": "reboot", "at_s": 1}]),
    "fault field of another kind": lambda d: d.update(faults=[{"kind": "node_kill", "host": "h1", "link": ["h1", "s1"],
                                                               "at_s": 1}]),
    "fault field missing": lambda d: d.update(faults=[{"kind": "link_down", "link": ["h1", "s1"], "at_s": 1}]),
    "fault link of one end": lambda d: d.update(faults=[{"kind": "link_down", "link": ["h1"], "at_s": 1,
                                                         "duration_s": 1}]),
    "fault empty profile": lambda d: d.update(faults=[{"kind": "link_profile", "link": ["h1", "s1"], "at_s": 1,
                                                       "profile": {}}]),
    "device speed zero": lambda d: d.update(backend="sim", nodes={"count": 2, "device": {"speed": 0}}),
    "devices on another backend": lambda d: d.update(devices=_inventory()),
    "backend devices without devices": lambda d: (d.pop("topology"), d.update(backend="devices")),
    "backend devices on a star": lambda d: d.update(backend="devices", devices=_inventory()),
    "device address without port": lambda d: (d.pop("topology"), d.update(backend="devices", devices={
        "nodes": [{"name": "a", "address": "10.0.0.1"}, {"name": "b", "address": "10.0.0.2:1"}]})),
    "device name with a space": lambda d: (d.pop("topology"), d.update(backend="devices", devices={
        "nodes": [{"name": "a b", "address": "10.0.0.1:1"}, {"name": "b", "address": "10.0.0.2:1"}]})),
    "device field unknown": lambda d: (d.pop("topology"), d.update(backend="devices", devices=_inventory(
        colour="red"))),
    "topology missing": lambda d: d.pop("topology"),
    "inline topology without hosts": lambda d: d.update(topology={"name": "x"}),
    "inline host name": lambda d: d.update(topology={"hosts": ["1x"]}),
    "inline link with profile and a_to_b": lambda d: d.update(topology={
        "hosts": ["h1", "h2"], "links": [{"a": "h1", "b": "h2", "profile": {}, "a_to_b": {}}]}),
    "inline link sweep": lambda d: d.update(topology={"hosts": ["h1", "h2"],
                                                      "links": [{"a": "h1", "b": "h2", "sweep": "partial"}]}),
}

#: what only the runner can check (a value against another field, the file system, uniqueness):
#: the schema accepts these, the runner refuses them
RUNNER_ONLY = {
    "jitter above delay": lambda d: d.update(backend="sim", sweep={"profiles": [{"delay_ms": 1, "jitter_ms": 2}]}),
    "shaped sweep on inprocess": lambda d: d.update(sweep={"bandwidth_mbps": [10]}),
    "same method twice": lambda d: d.update(methods=["single", "single"]),
    "no such topology file": lambda d: d.update(topology="nonexistent"),
    "codebook of one entry": lambda d: d.update(methods=[{"name": "astra", "params": {"codebook_size": 1}}]),
    "weights file missing": lambda d: d.update(model={"name": "vit-tiny", "weights_path": "/nonexistent.safetensors"}),
    "two devices of one name": lambda d: (d.pop("topology"), d.update(backend="devices", devices={
        "nodes": [{"name": "a", "address": "10.0.0.1:1"}, {"name": "a", "address": "10.0.0.2:1"}]})),
    "fewer devices than nodes": lambda d: (d.pop("topology"), d.update(backend="devices", devices={
        "nodes": [{"name": "a", "address": "10.0.0.1:1"}]})),
    "no such inventory file": lambda d: (d.pop("topology"), d.update(backend="devices", devices="nonexistent.yaml")),
}


def _doc(mutate) -> dict:
    d = tiny()
    mutate(d)
    return d


@pytest.mark.parametrize("case", sorted(GOOD))
def test_good_variants_pass_both(case):
    d = _doc(GOOD[case])
    assert [e.message for e in _validator("experiment").iter_errors(d)] == []
    assert _runner_error("experiment", d) is None


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_fail_both(case):
    d = _doc(BAD[case])
    assert not _validator("experiment").is_valid(d), f"the schema accepts {case}"
    assert _runner_error("experiment", d) is not None, f"the runner accepts {case}"


@pytest.mark.parametrize("case", sorted(RUNNER_ONLY))
def test_checks_only_the_runner_makes(case):
    d = _doc(RUNNER_ONLY[case])
    assert _validator("experiment").is_valid(d)
    assert _runner_error("experiment", d) is not None


def test_bad_topology_files_fail_both():
    v = _validator("topology")
    good = {"hosts": ["h1", "h2"], "switches": ["s1"], "links": [{"a": "h1", "b": "s1"}, {"a": "h2", "b": "s1"}]}
    assert v.is_valid(good) and _runner_error("topology", good) is None
    bad = [{"switches": []}, {"hosts": []}, {"hosts": [{"device": {}}]}, {"hosts": [{"name": "h1", "device": {"speed": 0}}]},
           {**good, "links": [{"a": "h1"}]}, {**good, "switches": [{"name": "s1", "sweep": "x"}]}, {**good, "colour": 1},
           {"hosts": ["h1"], "switches": [{"name": "s1", "medium": {"loss_pct": -1}}]}]
    for d in bad:
        assert not v.is_valid(d) and _runner_error("topology", d) is not None, d


# --------------------------------------------------------------------------- key sets
#: where a mapping is, in _full(); the validator's error for an unknown key there lists its fields
MAPPINGS = [(), ("model",), ("input",), ("methods", 5), ("methods", 5, "params"), ("nodes",), ("nodes", "device"),
            ("sweep",), ("sweep", "traces", 0), ("emulation",), ("faults", 0), ("faults", 0, "profile"),
            ("topology",), ("topology", "hosts", 1), ("topology", "hosts", 1, "device"), ("topology", "switches", 0),
            ("topology", "switches", 0, "medium"), ("topology", "links", 0), ("topology", "links", 0, "profile")]


def _fields_in(allowed: str) -> list[str]:
    return sorted(allowed.rsplit(": ", 1)[1].split(", "))


def _schema_fields(errors, where: list) -> list[str] | None:
    """The properties of the subschema that refused PROBE at ``where`` (searching oneOf/anyOf branches)."""
    for e in errors:
        if e.validator == "additionalProperties" and list(e.absolute_path) == where and PROBE in e.instance:
            return sorted(e.schema["properties"])
        found = _schema_fields(e.context or [], where)
        if found:
            return found
    return None


@pytest.mark.parametrize("where", MAPPINGS, ids=lambda w: ".".join(map(str, w)) or "top")
def test_schema_and_validator_know_the_same_fields(where):
    d = copy.deepcopy(_full())
    assert _runner_error("experiment", d) is None
    node = d
    for k in where:
        node = node[k]
    node[PROBE] = 1
    err = _runner_error("experiment", d)
    assert err is not None and PROBE in err.field + str(err.value) + err.allowed
    mine = _schema_fields(_validator("experiment").iter_errors(d), list(where))
    assert mine == _fields_in(err.allowed)


def test_schema_command_prints_json(capsys):
    from testbed.cli import main

    assert main(["schema", "topology"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "testbed topology"
