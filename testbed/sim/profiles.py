"""Compute profiles: per-rank schedule traces of one job measured on this host, stored as JSON.

A profile is keyed by what its compute depends on: (model, method, params, tokens,
nodes, threads, batch). It holds the N per-rank traces (Trace.to_dict, durations in
seconds on this host) either measured (testbed.sim.calibrate) or extrapolated
from measured ones (testbed.sim.extrapolate), marked as such with the keys it was
fitted on. One file per profile under ``results/calibration/`` by default, so that
calibration runs add files and never rewrite each other's.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from testbed.comm.trace import Trace
from testbed.errors import check

DEFAULT_ROOT = Path("results/calibration")
FORMAT = 1


@dataclass(frozen=True)
class ProfileKey:
    model: str
    method: str
    params_json: str = "{}"  # json.dumps(params, sort_keys=True)
    tokens: int = 197
    nodes: int = 1
    threads: int = 1  # torch intra-op threads per rank
    batch: int = 1

    @classmethod
    def of(cls, model: str, method: str, params: dict[str, Any] | None, tokens: int, nodes: int, threads: int = 1,
           batch: int = 1) -> "ProfileKey":
        return cls(model, method, json.dumps(params or {}, sort_keys=True), tokens, nodes, threads, batch)

    @property
    def params(self) -> dict[str, Any]:
        return json.loads(self.params_json)

    def family(self) -> tuple:
        """Profiles that can be fitted together: everything but tokens and nodes."""
        return (self.model, self.method, self.params_json, self.threads, self.batch)

    def slug(self) -> str:
        """A file name for the profile: readable, and unique through a short hash of the whole key."""
        digest = hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]
        model = re.sub(r"[^A-Za-z0-9._-]", "_", self.model)[-40:]
        return f"{model}__{self.method}__T{self.tokens}__N{self.nodes}__th{self.threads}__b{self.batch}__{digest}"


@dataclass
class ComputeProfile:
    key: ProfileKey
    traces: list[Trace]  # one per rank, rank order; durations in seconds on this host
    extrapolated: bool = False
    basis: list[ProfileKey] = field(default_factory=list)  # measured profiles an extrapolation was fitted on
    meta: dict[str, Any] = field(default_factory=dict)  # host, repetitions, fit, created

    def __post_init__(self) -> None:
        check(len(self.traces) == self.key.nodes, "traces", len(self.traces), f"one per node ({self.key.nodes})")

    @property
    def stale(self) -> bool:
        """Measured with other methods/models code than this checkout's (or of unknown code), or
        timed with another clock than calibrate.CLOCK (wall-clock profiles included host load)."""
        from testbed.sim.calibrate import CLOCK

        return self.meta.get("code") != code_fingerprint() or (not self.extrapolated and self.meta.get("clock") != CLOCK)

    @property
    def compute_s(self) -> list[float]:
        """Per rank: compute seconds on this host (serialization excluded)."""
        return [t.compute_s for t in self.traces]

    def to_dict(self) -> dict:
        return {"format": FORMAT, "key": asdict(self.key), "extrapolated": self.extrapolated,
                "basis": [asdict(k) for k in self.basis], "meta": self.meta,
                "traces": [t.to_dict() for t in self.traces]}

    @classmethod
    def from_dict(cls, d: dict) -> "ComputeProfile":
        check(d.get("format") == FORMAT, "calibration file format", d.get("format"), str(FORMAT))
        return cls(ProfileKey(**d["key"]), [Trace.from_dict(t) for t in d["traces"]], bool(d["extrapolated"]),
                   [ProfileKey(**k) for k in d.get("basis", [])], dict(d.get("meta", {})))


#: the code a compute profile measures: a change here makes stored profiles stale
_MEASURED_CODE = ("methods", "models", "comm/base.py", "comm/serde.py")  # methods/ holds the job spec


def code_fingerprint() -> str:
    """Hash of the source files whose speed a profile measured (methods, models, collectives)."""
    pkg = Path(__file__).resolve().parents[1]
    h = hashlib.sha1()
    for part in _MEASURED_CODE:
        p = pkg / part
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            h.update(f.relative_to(pkg).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def host_info() -> dict[str, Any]:
    """Where a profile was measured (profiles from another machine do not describe this one)."""
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"hostname": platform.node(), "cpu": cpu, "cpus": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "code": code_fingerprint()}


class ProfileStore:
    """A directory of profile files (JSON), one per key."""

    def __init__(self, root: str | Path = DEFAULT_ROOT):
        self.root = Path(root)

    def path(self, key: ProfileKey) -> Path:
        return self.root / f"{key.slug()}.json"

    def get(self, key: ProfileKey) -> ComputeProfile | None:
        p = self.path(key)
        if not p.is_file():
            return None
        return ComputeProfile.from_dict(json.loads(p.read_text()))

    def put(self, profile: ComputeProfile) -> Path:
        """Write one profile (atomically: a crash leaves the old file or none)."""
        self.root.mkdir(parents=True, exist_ok=True)
        p = self.path(profile.key)
        tmp = p.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(profile.to_dict()))
        tmp.replace(p)
        return p

    def all(self) -> list[ComputeProfile]:
        if not self.root.is_dir():
            return []
        return [ComputeProfile.from_dict(json.loads(p.read_text())) for p in sorted(self.root.glob("*.json"))]

    def transport_path(self) -> Path:
        return self.root / "transport" / "grpc.json"  # a subdirectory: not a profile file

    def transport(self) -> dict | None:
        """The stored transport calibration (calibrate.measure_transport), if any."""
        p = self.transport_path()
        return json.loads(p.read_text()) if p.is_file() else None

    def put_transport(self, measured: dict) -> Path:
        p = self.transport_path()
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({**measured, **host_info()}, indent=1))
        return p

    def measured(self, key: ProfileKey, current: bool = True) -> list[ComputeProfile]:
        """Measured (not extrapolated) profiles of ``key``'s family: fit material (``current``: not stale)."""
        return [p for p in self.all() if not p.extrapolated and p.key.family() == key.family()
                and not (current and p.stale)]
