"""The ``sim`` backend: the same sweep, inferences from the SimPy model (testbed.sim) instead of nodes.

Each inference is one ``Simulator.results`` call for the loaded job on the applied link
profile; compute profiles are measured on this host (or extrapolated) by the simulator
and cached in its calibration directory; those a run lacks are measured together before its
first cell (``prepare``), their repetitions interleaved. Results are the runner's InferenceResult built
from the simulator's per-rank results: no output (nothing is computed: agreement is NaN),
no schedule traces, and the modelled bytes on the wire as the ``wire_bytes`` counter.
``mechanism`` says whether the loaded job's compute profile was measured or extrapolated
(``sim/measured``, ``sim/extrapolated``; ``sim`` until a job is loaded). Each rank's device
speed becomes its compute slow-down; repetition r samples loss and jitter with seed r.

Settings (``BackendSetup.settings``, from `testbed run` / `testbed simulate` options):
``tcp`` (slow_start | steady), ``loss_mode`` (sampled | expected), ``no_overhead`` (payload
only on the wire), ``per_message_s``, ``speed`` (one factor or one per node, overriding the
devices), ``shared_cpus``, ``calibration`` (profiles directory), ``measure`` (measure missing
profiles), ``max_measure_tokens``, ``max_measure_nodes``, ``calibration_repetitions``.

close() writes ``sim.json`` into the run directory: the wire and TCP model used and where
every compute profile came from (merged with what an earlier session of the run wrote).
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from testbed.backends.base import Backend, BackendSetup
from testbed.comm.trace import Trace
from testbed.errors import ConfigError, check
from testbed.methods.job import JobSpec
from testbed.net.profile import LinkProfile
from testbed.node.records import InferenceResult, RankResult
from testbed.sim.network import KINDS, LOSS_MODES, TCP_MODES, TcpModel, WireModel
from testbed.sim.profiles import ProfileKey
from testbed.sim.simulator import SimConfig, Simulator, speed_from_device

SIM_RECORD = "sim.json"
DEFAULTS: dict[str, Any] = {
    "tcp": "slow_start", "loss_mode": "sampled", "no_overhead": False, "per_message_s": None, "speed": None,
    "shared_cpus": None, "calibration": "results/calibration", "measure": True, "max_measure_tokens": 1024,
    "max_measure_nodes": 8, "calibration_repetitions": 3,
}


def sim_config(settings: dict[str, Any]) -> SimConfig:
    """The simulator's configuration from the backend's settings (unknown keys refused)."""
    unknown = sorted(set(settings) - set(DEFAULTS))
    check(not unknown, f"sim settings ({', '.join(unknown)})", unknown, " | ".join(DEFAULTS))
    s = {**DEFAULTS, **settings}
    check(s["tcp"] in TCP_MODES, "--tcp", s["tcp"], " | ".join(TCP_MODES))
    check(s["loss_mode"] in LOSS_MODES, "--loss-mode", s["loss_mode"], " | ".join(LOSS_MODES))
    wire = None  # WireModel's defaults with the gRPC transport's measured costs
    if s["no_overhead"] or s["per_message_s"] is not None:
        wire = WireModel.none() if s["no_overhead"] else WireModel()
        if s["per_message_s"] is not None:
            wire = replace(wire, per_message_s=s["per_message_s"])
    return SimConfig(wire=wire, tcp=TcpModel(mode=s["tcp"], loss_mode=s["loss_mode"]),
                     calibration_dir=s["calibration"], measure_missing=bool(s["measure"]),
                     max_measure_tokens=s["max_measure_tokens"], max_measure_nodes=s["max_measure_nodes"],
                     calibration_repetitions=s["calibration_repetitions"], shared_cpus=s["shared_cpus"])


def rank_speeds(devices: list, n: int, override: list[float] | None) -> list[float]:
    """Per-rank compute factors: ``override`` (one factor or one per node), else each device's speed."""
    if override:
        check(len(override) in (1, n), "--speed", override, f"one factor or {n} (one per node)")
        return list(override) * n if len(override) == 1 else list(override)
    speeds = [speed_from_device(d.speed) for d in devices[:n]]
    return speeds + [1.0] * (n - len(speeds))


class SimBackend(Backend):
    name = "sim"
    mechanism = "sim"
    computes = False
    computes_here = False
    keeps_traces = False
    SETTINGS = tuple(DEFAULTS)

    def __init__(self, simulator: Simulator, topology: Any, speeds: list[float], run_dir: Path | None = None):
        """``topology``: a topology kind (star | mesh | line | shared_medium, any N) or a loaded
        testbed.net.topology.Topology; ``speeds``: compute slow-down per rank."""
        self.sim, self.topology, self.speeds, self.run_dir = simulator, topology, speeds, run_dir
        self.n_nodes = 0
        self.profile = LinkProfile()
        self.job: JobSpec | None = None
        self.key: ProfileKey | None = None
        self.bytes_on_wire = 0
        self.simulated = False
        self.inferences = 0  # since the job was loaded: its first runs on new connections (cold)

    @classmethod
    def from_setup(cls, setup: BackendSetup) -> "SimBackend":
        src = setup.topology_source
        topology = src if isinstance(src, str) and src in KINDS else setup.topology
        sim = Simulator(sim_config(setup.settings), log=setup.log)
        speeds = rank_speeds(setup.devices, setup.nodes, setup.settings.get("speed"))
        return cls(sim, topology, speeds, setup.run_dir)

    def start(self, n_nodes: int) -> None:
        self.n_nodes = n_nodes

    def apply_profile(self, profile: LinkProfile) -> None:
        check(isinstance(profile, LinkProfile), "profile", profile, "a testbed.net.profile.LinkProfile")
        self.profile = profile

    def prepare(self, jobs: list[JobSpec]) -> None:
        """Measure the compute profiles these jobs need and the calibration lacks in one calibration,
        their repetitions interleaved (``Simulator.measure_many``), rather than one by one as each is
        loaded: one job's every repetition cannot then fall into one slow phase of the host."""
        keys = [ProfileKey.of(j.model, j.method, j.params, j.tokens, j.world_size, j.threads, j.batch) for j in jobs]
        todo = [k for k in dict.fromkeys(keys) if self.sim.wants_measuring(k)]
        if len(todo) > 1:
            self.sim.measure_many(todo)

    def load(self, job: JobSpec) -> None:
        """Find the job's compute profile (measuring or extrapolating it now) and check the network. Its
        first inference runs on new connections (a node opens new peer channels per job): cold windows."""
        if job.world_size != self.n_nodes:
            raise ConfigError("world_size", job.world_size, f"{self.n_nodes} (the ranks started)")
        self.job, self.key, self.mechanism = None, None, "sim"
        key = ProfileKey.of(job.model, job.method, job.params, job.tokens, job.world_size, job.threads, job.batch)
        self.sim.schedule(key)
        self.sim.network(self.topology, job.world_size, self.profile)
        self.job, self.key, self.mechanism = job, key, self.sim.mechanism(key)
        self.inferences = 0

    def infer(self, repetition: int | None = None) -> InferenceResult:
        if self.job is None:
            raise ConfigError("job", None, "a job loaded with load() before infer()")
        j = self.job
        res = self.sim.results(model=j.model, method=j.method, params=j.params, tokens=j.tokens, nodes=j.world_size,
                               topology=self.topology, profile=self.profile, speed=self.speeds, threads=j.threads,
                               batch=j.batch, first_repetition=repetition or 0, warm=self.inferences > 0)[0]
        self.simulated = True
        self.inferences += 1
        self.bytes_on_wire += res.bytes_on_wire
        nodes = [RankResult(rank=s.rank, output=None, wall_s=s.finish_s, compute_s=s.compute_s, comm_s=s.comm_s,
                            wait_s=s.wait_s, serialize_s=s.serialize_s, bytes_sent=s.bytes_sent, bytes_recv=0,
                            trace=Trace(rank=s.rank), address=f"sim:{s.rank}") for s in res.ranks]
        return InferenceResult(output=None, latency_s=res.latency_s, nodes=nodes)

    def wire_bytes(self) -> int:
        """Modelled bytes on all links (headers, retransmissions, ACKs) since start."""
        return self.bytes_on_wire

    def close(self) -> None:
        if self.run_dir is not None and self.sim.profiles_used():
            self._write_record(Path(self.run_dir) / SIM_RECORD)
        self.job, self.key, self.n_nodes = None, None, 0

    def _write_record(self, path: Path) -> None:
        old: dict = {}
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except ValueError:
                old = {}
        profiles = {p["file"]: p for p in old.get("profiles", [])}
        profiles.update({str(self.sim.store.path(k)): {"key": asdict(k), "extrapolated": p.extrapolated,
                                                        "file": str(self.sim.store.path(k))}
                         for k, p in self.sim.profiles_used().items()})
        c = self.sim.config
        record = {"wire": asdict(self.sim.wire) if self.simulated else old.get("wire"), "tcp": asdict(c.tcp),
                  "calibration_dir": c.calibration_dir, "shared_cpus": c.shared_cpus, "speeds": self.speeds,
                  "profiles": list(profiles.values())}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1, default=str))
