"""JSON Schemas of the YAML files users write (experiments, topologies), for editors.

`testbed schema experiment > experiments/experiment.schema.json` writes the schema that the YAML
language server (VS Code's YAML extension, Neovim, Helix, ...) reads from a file's first line::

    # yaml-language-server: $schema=experiment.schema.json

so a file is checked and completed while it is written. The schemas are built here from the
validating code's own names and limits (backends, methods and their params, model names, link
axes, fault kinds, sweep modes, ranges such as ``MAX_SPEED``); the key sets of the validators'
mappings are compared with the schemas' by ``tests/experiment/test_schema.py``, which feeds them
unknown keys and reads the fields their errors allow. The runner stays the authority: what a
schema cannot state (a value against another field, as jitter against delay or a shaped sweep on
a backend that cannot shape; files that must exist; distinct entries) is checked when a run
starts; ``runner_checks`` runs those checks without loading any model.

Draft 7, the draft every YAML editor integration supports.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from typing import Any

from testbed.errors import ConfigError
from testbed.experiment import faults as FA
from testbed.experiment import spec as S
from testbed.net import topology as T
from testbed.net.profile import MAX_BANDWIDTH_MBPS, LinkProfile

DRAFT = "http://json-schema.org/draft-07/schema#"
#: kind -> (schema builder, the file it is committed as, relative to the repository root)
KINDS = ("experiment", "topology")
COMMITTED = {"experiment": "experiments/experiment.schema.json", "topology": "topologies/topology.schema.json"}
#: the first line of every committed YAML file of each kind
MODELINE = {"experiment": "# yaml-language-server: $schema=experiment.schema.json",
            "topology": "# yaml-language-server: $schema=topology.schema.json"}


def _nullable(s: dict) -> dict:
    return {"anyOf": [s, {"type": "null"}]}


def _obj(props: dict, required: tuple = (), **kw) -> dict:
    return {"type": "object", "properties": props, "additionalProperties": False,
            **({"required": list(required)} if required else {}), **kw}


STRING = {"type": "string", "minLength": 1}


# --------------------------------------------------------------------------- link profiles
def _axis(name: str) -> dict:
    """One link field of a LinkProfile (testbed.net.profile), with its limits."""
    return {
        "bandwidth_mbps": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": MAX_BANDWIDTH_MBPS,
                                     "description": "Mbit/s; null: unshaped"}),
        "delay_ms": {"type": "number", "minimum": 0, "description": "one-way delay, ms"},
        "jitter_ms": {"type": "number", "minimum": 0, "description": "ms, at most delay_ms"},
        "loss_pct": {"type": "number", "minimum": 0, "exclusiveMaximum": 100, "description": "percent of packets"},
        "queue_packets": _nullable({"type": "integer", "minimum": 2, "description": "null: from the BDP"}),
    }[name]


def profile_schema() -> dict:
    return _obj({f.name: _axis(f.name) for f in fields(LinkProfile)})


# --------------------------------------------------------------------------- topology
def _device() -> dict:
    return _nullable(_obj({
        "speed": {"type": "number", "exclusiveMinimum": 0, "maximum": T.MAX_SPEED,
                  "description": "per device core, in cores of this host (1.0: one core; 0.25: 4x slower)"},
        "threads": _nullable({"type": "integer", "minimum": 1}),
        "memory_mb": _nullable({"type": "integer", "minimum": 16}),
    }))


def topology_schema(top: bool = True) -> dict:
    """Schema of a topology file (testbed.net.topology.topology_from_dict)."""
    name = {"type": "string", "pattern": T._NAME.pattern}
    sweep = {"enum": list(T.SWEEP_MODES), "description": "how the experiment's sweep profile maps onto this link"}
    host = {"oneOf": [name, _obj({"name": name, "device": _device()}, ("name",))]}
    switch = {"oneOf": [name, _obj({"name": name, "medium": _nullable({"$ref": "#/definitions/profile"}),
                                    "sweep": sweep}, ("name",))]}
    prof = _nullable({"$ref": "#/definitions/profile"})
    link = _obj({"a": STRING, "b": STRING, "profile": prof, "a_to_b": prof, "b_to_a": prof, "sweep": sweep},
                ("a", "b"), **{"not": {"required": ["profile"], "anyOf": [{"required": ["a_to_b"]},
                                                                           {"required": ["b_to_a"]}]}})
    s = _obj({"name": STRING, "description": {"description": "free text"},
              "hosts": {"type": "array", "items": host, "minItems": 1, "maxItems": T.MAX_HOSTS},
              "switches": {"type": "array", "items": switch, "maxItems": T.MAX_SWITCHES},
              "links": {"type": "array", "items": link}}, ("hosts",))
    if top:
        s = {"$schema": DRAFT, "title": "testbed topology", "description": T.__doc__.split("\n\n")[0].strip(),
             **s, "definitions": {"profile": profile_schema()}}
    return s


# --------------------------------------------------------------------------- experiment
def _methods() -> dict:
    from testbed.methods import METHODS, method_class

    per_method = []
    for m in METHODS:
        defaults = method_class(m).DEFAULTS
        params = {k: ({"default": v} if v is not None else {}) for k, v in defaults.items()}
        per_method.append({"if": {"properties": {"name": {"const": m}}},
                           "then": {"properties": {"params": _nullable(_obj(params))}}})
    entry = _obj({"name": {"enum": list(METHODS)}, "params": _nullable({"type": "object"}),
                  "label": _nullable({"type": "string", "minLength": 1, "description": "legend text"})},
                 ("name",), allOf=per_method)
    return {"type": "array", "minItems": 1, "items": {"oneOf": [{"enum": list(METHODS)}, entry]}}


def _sweep() -> dict:
    def values(a: str) -> dict:
        one = _axis(a)
        return {"anyOf": [one, {"type": "array", "items": one, "minItems": 1, "uniqueItems": True}]}

    trace = _obj({"name": STRING,
                  "points": {"type": "array", "minItems": 1, "description": "[time_s, bandwidth_mbps] pairs",
                             "items": {"type": "array", "minItems": 2, "maxItems": 2,
                                       "items": [{"type": "number", "minimum": 0}, _axis("bandwidth_mbps")["anyOf"][0]]}},
                  "path": {"type": "string", "minLength": 1, "description": "CSV time_s,bandwidth_mbps or Mahimahi"},
                  **{a: _axis(a) for a in S.LINK_AXES if a != "bandwidth_mbps"},
                  "loop": {"type": "boolean"}}, ("name",),
                 oneOf=[{"required": ["points"]}, {"required": ["path"]}])
    grid = {a: values(a) for a in S.LINK_AXES}
    return _nullable(_obj({**grid, "profiles": {"type": "array", "minItems": 1, "items": {"$ref": "#/definitions/profile"}},
                           "traces": {"type": "array", "minItems": 1, "items": trace}},
                          dependencies={"profiles": {"not": {"anyOf": [{"required": [a]} for a in S.LINK_AXES]}}}))


def _faults() -> dict:
    targets = ("link", "host", "duration_s", "profile")
    by_kind = [{"if": {"properties": {"kind": {"const": k}}},
                "then": {"required": list(FA.REQUIRED_BY_KIND[k]),
                         "not": {"anyOf": [{"required": [t]} for t in targets if t not in FA.FIELDS_BY_KIND[k]]}}}
               for k in FA.KINDS]
    event = _obj({"kind": {"enum": list(FA.KINDS)},
                  "at_s": {"type": "number", "minimum": 0, "maximum": FA.MAX_TIME_S,
                           "description": "device seconds after the unit's repetitions start"},
                  "link": {"type": "array", "items": STRING, "minItems": 2, "maxItems": 2,
                           "description": "the link's two ends, as in the topology"},
                  "host": STRING,
                  "duration_s": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": FA.MAX_TIME_S}),
                  "profile": _obj({a: _axis(a) for a in FA.PROFILE_FIELDS}, minProperties=1),
                  "name": STRING}, ("kind", "at_s"), allOf=by_kind)
    return _nullable({"type": "array", "items": event})


def experiment_schema() -> dict:
    """Schema of an experiment file (testbed.experiment.spec.parse_spec)."""
    from testbed.models import CONFIGS

    model = _obj({"name": {**STRING, "examples": list(CONFIGS)}, "weights_path": _nullable(STRING),
                  "codebook_path": _nullable(STRING), "dataset": _nullable(STRING)}, ("name",))
    nodes = _obj({"count": {"type": "integer", "minimum": 1, "maximum": 64, "description": "ranks, one node each"},
                  "threads": {"type": "integer", "minimum": 1, "maximum": 256},
                  "device": _nullable(_obj({"speed": _nullable({"type": "number", "exclusiveMinimum": 0,
                                                                "maximum": T.MAX_SPEED})})),
                  "memory_mb": _nullable({"type": "integer", "minimum": 16})}, ("count",))
    emulation = _nullable(_obj({
        "time_dilation": {"anyOf": [{"const": "auto"}, {"type": "number", "minimum": 1, "maximum": S.MAX_DILATION}]},
        "reserve_cores": {"type": "number", "minimum": 0, "maximum": 64},
        "cpu_slice_ms": {"type": "number", "minimum": 0.5, "maximum": 1000},
        "pace_compute": {"type": "boolean"}, "network_core": {"type": "boolean"}}))
    props = {
        "name": {"type": "string", "pattern": S.NAME_RE.pattern, "description": "names the output directory"},
        "description": _nullable(STRING),
        "model": {"oneOf": [STRING, model]},
        "input": _obj({"tokens": {"type": "integer", "minimum": 1}, "batch": {"type": "integer", "minimum": 1},
                       "seed": {"type": "integer", "minimum": 0},
                       "generate": {"type": "integer", "minimum": 0}}, ("tokens",)),
        "methods": _methods(),
        "nodes": {"oneOf": [{"type": "integer", "minimum": 1, "maximum": 64}, nodes]},
        "topology": {"oneOf": [{**STRING, "description": "a file in topologies/ (star, mesh, ...) or a path"},
                               {"$ref": "#/definitions/topology"}]},
        "sweep": _sweep(),
        "repetitions": {"type": "integer", "minimum": 1},
        "warmup": {"type": "integer", "minimum": 0},
        "backend": {"enum": list(S.BACKENDS)},
        "output_dir": _nullable(STRING),
        "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 86400},
        "fidelity_s": {"type": "number", "anyOf": [{"const": 0}, {"minimum": 1, "maximum": 60}]},
        "emulation": emulation,
        "faults": _faults(),
        "devices": _devices(),
    }
    # backend devices needs `devices` and takes no topology but mesh; every other backend the reverse
    devices = {"properties": {"backend": {"const": "devices"}}, "required": ["backend"]}
    others = {"required": ["topology"], "not": {"required": ["devices"]}}
    return {"$schema": DRAFT, "title": "testbed experiment",
            "description": S.__doc__.split("\n\n")[0].strip(),
            **_obj(props, ("name", "model", "input", "methods", "nodes")),
            "if": devices,
            "then": {"required": ["devices"], "properties": {"topology": {"const": S.DEVICES_TOPOLOGY}}},
            "else": others,
            "definitions": {"profile": profile_schema(), "topology": topology_schema(top=False)}}


def _devices() -> dict:
    """The inventory of backend devices (testbed.experiment.inventory), inline or as a file's path."""
    from testbed.experiment import inventory as I

    node = _obj({"name": {"type": "string", "pattern": I.DEVICE_NAME_RE.pattern},
                 "address": {"type": "string", "pattern": r"^(\[[^\]\s]+\]|[^\s:\[\]]+):[0-9]{1,5}$",
                             "description": "HOST:PORT of a node server (python -m testbed.node --listen ...)"},
                 "device": _device()}, ("name", "address"))
    inventory = _obj({"nodes": {"type": "array", "items": node, "minItems": 1,
                                "description": "nodes.count devices, in rank order"},
                      "tls": _nullable({**STRING, "description": "a directory made by `testbed certs`"}),
                      "connect_timeout_s": {"type": "number", "exclusiveMinimum": 0,
                                            "maximum": I.MAX_CONNECT_TIMEOUT_S}}, ("nodes",))
    return {"oneOf": [{**STRING, "description": "a path to an inventory YAML file"}, inventory]}


def schema(kind: str) -> dict:
    if kind not in KINDS:
        raise ConfigError("kind", kind, " | ".join(KINDS))
    return experiment_schema() if kind == "experiment" else topology_schema()


def to_json(kind: str) -> str:
    return json.dumps(schema(kind), indent=2) + "\n"


def runner_checks(kind: str, data: Any) -> None:
    """What a run checks of a file's content before it starts, without loading a model: raises ConfigError.

    experiment: parse_spec, every method's params (testbed.methods.resolve_params without a model)
    and the topology it names or holds; topology: topology_from_dict."""
    from testbed.methods import resolve_params

    if kind == "topology":
        T.topology_from_dict(data)
        return
    spec = S.parse_spec(data)
    for i, m in enumerate(spec.methods):
        try:
            resolve_params(m.name, m.params)
        except ConfigError as e:
            raise ConfigError(f"methods[{i}].{e.field}", e.value, e.allowed) from None
    from testbed.experiment.topology import spec_topology

    spec_topology(spec)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="testbed schema", description="Print the JSON Schema of a kind of YAML file "
                                "(for editors: the YAML language server reads it from a file's "
                                "`# yaml-language-server: $schema=...` line).")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--out", metavar="FILE", help="write it to FILE instead of stdout")
    a = p.parse_args(argv)
    text = to_json(a.kind)
    if a.out:
        from pathlib import Path

        Path(a.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0
