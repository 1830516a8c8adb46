"""One experiment cell on the simulator: find its compute profile, replay it, return per-rank results.

This is the API the ``sim`` backend (testbed.backends.sim) calls::

    sim = Simulator(SimConfig())
    results = sim.results(model="vit-small", method="astra", params={"groups": 1}, tokens=197, nodes=4,
                          topology="star", profile=LinkProfile(10, 5), repetitions=3)

Where compute times come from, in order of preference:
1. a measured profile of exactly this (model, method, params, tokens, nodes, threads, batch)
   in the calibration directory;
2. measuring it now (``testbed.sim.calibrate``), if ``measure_missing`` and it is small
   enough (``max_measure_tokens``, ``max_measure_nodes``); the result is stored. Profiles
   measured together (``measure_many``: ``testbed calibrate``, ``testbed validate``, a sim run) have
   their repetitions interleaved round-robin;
3. extrapolating from measured profiles of the same family (``testbed.sim.extrapolate``),
   first measuring a small basis grid if fewer than two points exist. Such rows say
   ``sim/extrapolated`` in their ``mechanism`` column (else ``sim/measured``).
A model too large to build here (``testbed.sim.proxy.PROXIES``: Llama-3-8B) takes its compute
from a proxy with the same blocks, fewer of them, found by the same three steps (also
``sim/extrapolated``).

Device speed: ``speed`` scales compute per rank (3.0 = three times slower than this
host). ``speed_from_device`` turns a device profile's core speed into that factor.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from testbed.comm.trace import Compute, Trace
from testbed.errors import check
from testbed.methods.job import JobSpec
from testbed.models.probe import host_probe_s
from testbed.net.profile import LinkProfile
from testbed.sim.calibrate import CLOCK, measure_interleaved
from testbed.sim.engine import Schedule, SimResult, simulate
from testbed.sim.extrapolate import extrapolate
from testbed.sim.network import KINDS, Network, SimTopology, TcpModel, WireModel
from testbed.sim.profiles import ComputeProfile, ProfileKey, ProfileStore, host_info
from testbed.sim.proxy import from_proxy, proxy_key
from testbed.sim.synth import WIDTH_SPLIT, skeleton

@dataclass(frozen=True)
class SimConfig:
    #: None: WireModel's defaults with ``per_message_s`` and ``stack_bytes_per_s`` measured on this host
    #: (the gRPC transport's one-way small-message time and bulk rate, calibrate.measure_transport)
    wire: WireModel | None = None
    tcp: TcpModel = field(default_factory=TcpModel)
    calibration_dir: str = "results/calibration"
    measure_missing: bool = True  # measure profiles that are not stored (else: extrapolate or fail)
    max_measure_tokens: int = 1024  # larger token counts are extrapolated
    max_measure_nodes: int = 8  # more ranks than this are extrapolated (all run in this process)
    calibration_repetitions: int = 3
    calibration_warmup: int = 1
    #: the devices share this many cores (emulation on one machine, e.g. Mininet here): compute of the
    #: busy ranks is stretched by max(1, busy * threads / shared_cpus); None: every device has its own
    shared_cpus: int | None = None
    #: multiplies every compute segment: 1.0 for devices as calibrated; a time-dilated emulation's CPU
    #: overhead of CFS throttling when predicting one (testbed.sim.emulation.EmulationModel)
    compute_scale: float = 1.0
    #: per-segment jitter of compute (sqrt-seconds): a segment of d device seconds takes d + k * sqrt(d) * z,
    #: z standard normal, drawn per rank, segment and repetition (seed r). 0: every segment as calibrated.
    #: Ranks that synchronise after every block then wait for the slowest draw (testbed.sim.emulation)
    segment_jitter_k: float = 0.0
    #: seconds added to every inference outside the ranks' schedules (an emulated run's dispatch:
    #: testbed.sim.emulation.dispatch_overhead_s); 0 for devices as calibrated
    dispatch_s: float = 0.0

    def __post_init__(self) -> None:
        check(self.wire is None or isinstance(self.wire, WireModel), "wire", self.wire, "a WireModel or None")
        check(isinstance(self.tcp, TcpModel), "tcp", self.tcp, "a TcpModel")
        for name in ("max_measure_tokens", "max_measure_nodes", "calibration_repetitions"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, v, "an integer >= 1")
        check(isinstance(self.calibration_warmup, int) and self.calibration_warmup >= 0, "calibration_warmup",
              self.calibration_warmup, "an integer >= 0")
        c = self.shared_cpus
        check(c is None or (isinstance(c, int) and c >= 1), "shared_cpus", c, "an integer >= 1 or null")
        k = self.compute_scale
        check(isinstance(k, (int, float)) and not isinstance(k, bool) and k > 0, "compute_scale", k, "a number > 0")
        j = self.segment_jitter_k
        check(isinstance(j, (int, float)) and not isinstance(j, bool) and j >= 0, "segment_jitter_k", j,
              "a number >= 0 (sqrt-seconds)")
        x = self.dispatch_s
        check(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0, "dispatch_s", x, "seconds >= 0")


def contention_factor(profile: ComputeProfile, shared_cpus: int | None) -> float:
    """Compute stretch when the ranks share ``shared_cpus`` cores (first order: the ranks that compute
    at all, each with ``threads`` threads, compute at the same time and share the cores evenly)."""
    if shared_cpus is None:
        return 1.0
    comp = profile.compute_s
    busy = sum(1 for c in comp if c >= 0.1 * max(comp)) if max(comp, default=0) > 0 else 0
    return max(1.0, busy * profile.key.threads / shared_cpus)


def jittered(traces: Sequence[Trace], factors: Sequence[float], k: float, seed: int) -> list[Trace]:
    """Copies of ``traces`` whose compute segments carry jitter of ``k * sqrt(device seconds)``.

    Rank i's segment of d host seconds runs d * factors[i] device seconds in the replay; its copy
    gets d + k * sqrt(d * f) * z / f (z standard normal, drawn from ``seed`` and the rank; never
    below 0), so that the replayed segment is d * f + k * sqrt(d * f) * z.
    """
    import numpy as np

    out = []
    for i, tr in enumerate(traces):
        rng = np.random.default_rng([seed, i, 0x5E9])
        f = factors[i]
        events = []
        for ev in tr.events:
            if isinstance(ev, Compute) and ev.duration_s > 0:
                d = ev.duration_s
                ev = Compute(max(0.0, d + k * math.sqrt(d * f) * float(rng.standard_normal()) / f))
            events.append(ev)
        out.append(Trace(tr.rank, events))
    return out


def _carry_probe(prof: ComputeProfile, sources: Sequence[ComputeProfile]) -> None:
    """An extrapolated profile's host probe: the median of its measured sources' (none if they have none)."""
    probes = [p.meta["host_probe_s"] for p in sources if p.meta.get("host_probe_s")]
    if probes and "host_probe_s" not in prof.meta:
        prof.meta["host_probe_s"] = statistics.median(probes)


def speed_from_device(speed: float | None) -> float:
    """Compute slow-down of a rank on a device whose cores run at ``speed`` cores of this host
    (testbed.net.topology.DeviceProfile.speed; profiles are calibrated on free cores of this
    host). None: 1.0."""
    if speed is None:
        return 1.0
    check(isinstance(speed, (int, float)) and not isinstance(speed, bool) and speed > 0, "speed", speed,
          "a number > 0 (1.0 = one core of this host)")
    return 1.0 / speed


class Simulator:
    """Finds compute profiles (measuring or extrapolating as needed) and replays them over networks."""

    def __init__(self, config: SimConfig | None = None, log: Callable[[str], None] | None = None):
        self.config = config or SimConfig()
        self.store = ProfileStore(self.config.calibration_dir)
        self.log = log or (lambda msg: None)
        self._profiles: dict[ProfileKey, ComputeProfile] = {}
        self._schedules: dict[ProfileKey, Schedule] = {}
        self._wire = self.config.wire

    @property
    def wire(self) -> WireModel:
        """The wire model in use (see SimConfig.wire); measures the transport once if needed."""
        if self._wire is None:
            t = self.store.transport()
            if t is not None and "batches" not in t and self.config.measure_missing:
                self.log("transport calibration timed as one mean (host load included): measuring again")
                t = None
            if t is None and self.config.measure_missing:
                from testbed.sim.calibrate import measure_transport

                self.log("calibrating the gRPC transport (per-message cost)")
                self.store.put_transport(measure_transport())
                t = self.store.transport()
            if t is None:
                self.log("no transport calibration: per-message cost 0")
            self._wire = WireModel(per_message_s=float(t["per_message_s"]) if t else 0.0,
                                   stack_bytes_per_s=float(t["bulk_bytes_per_s"]) if t else None)
        return self._wire

    # -- compute profiles ---------------------------------------------------------------
    def measurable(self, key: ProfileKey) -> bool:
        c = self.config
        return key.tokens <= c.max_measure_tokens and key.nodes <= c.max_measure_nodes

    def wants_measuring(self, key: ProfileKey) -> bool:
        """Whether ``profile(key)`` would measure ``key`` now: measuring allowed, small enough to
        build here, and stored not at all, only extrapolated, or measured with other code."""
        if not (self.config.measure_missing and self.measurable(key)) or proxy_key(key) is not None:
            return False
        prof = self.store.get(key)
        return prof is None or prof.extrapolated or prof.stale

    def measure(self, key: ProfileKey) -> ComputeProfile:
        """Measure ``key`` on this host now and store it."""
        return self.measure_many([key])[0]

    def measure_many(self, keys: Sequence[ProfileKey]) -> list[ComputeProfile]:
        """Measure ``keys`` on this host now, their repetitions interleaved round-robin
        (``testbed.sim.calibrate.measure_interleaved``: one job's repetitions cannot all fall into one
        slow phase of the host), and store them; keys with other thread counts are measured apart."""
        c = self.config
        keys = list(dict.fromkeys(keys))
        done: dict[ProfileKey, ComputeProfile] = {}
        for threads in dict.fromkeys(k.threads for k in keys):
            batch = [k for k in keys if k.threads == threads]
            for k in batch:
                self.log(f"calibrating {k.model} {k.method} {k.params_json} T={k.tokens} N={k.nodes} threads={k.threads}")
            if len(batch) > 1:
                self.log(f"{len(batch)} profiles, {c.calibration_repetitions} repetitions each, interleaved")
            jobs = [JobSpec(k.model, k.method, k.nodes, k.tokens, k.params, batch=k.batch, threads=k.threads)
                    for k in batch]
            t0 = time.perf_counter()
            measured = measure_interleaved(jobs, c.calibration_repetitions, c.calibration_warmup,
                                           probe=host_probe_s, log=self.log if len(batch) > 1 else None)
            wall = time.perf_counter() - t0
            for k, m in zip(batch, measured):
                meta = {**host_info(), "repetitions": c.calibration_repetitions, "warmup": c.calibration_warmup,
                        "wall_s": wall, "how": "in-process, ranks take turns on the CPU"
                        + (f"; repetitions interleaved with {len(batch) - 1} other profile(s)" if len(batch) > 1 else ""),
                        # the host's speed while it measured (testbed.models.probe), median over its repetitions
                        "clock": CLOCK, "host_probe_s": statistics.median(m.probes_s)}
                prof = ComputeProfile(k, m.traces, meta=meta)
                self.store.put(prof)
                done[k] = prof
        return [done[k] for k in keys]

    def basis(self, key: ProfileKey) -> list[ProfileKey]:
        """Small (tokens, nodes) points to fit an extrapolation of ``key`` on."""
        from testbed.models import get_config

        c, cfg = self.config, get_config(key.model)
        top = min(key.tokens, c.max_measure_tokens)
        tokens = sorted({max(8, top // 4), max(8, top // 2), top})
        if key.nodes == 1:
            nodes = [1]
        else:
            nodes = [n for n in (2, 3, 4, 6, 8) if n <= min(key.nodes, c.max_measure_nodes)
                     and (key.method not in WIDTH_SPLIT or cfg.n_heads % n == 0)][:2]
        return [ProfileKey(key.model, key.method, key.params_json, t, n, key.threads, key.batch)
                for t in tokens for n in nodes if n < t]

    def profile(self, key: ProfileKey) -> ComputeProfile:
        """The compute profile of ``key`` (see the module docstring for where it comes from)."""
        if key in self._profiles:
            return self._profiles[key]
        skeleton(key.model, key.method, key.params, key.tokens, key.nodes, key.batch)  # invalid cells fail here
        prof = self.store.get(key)
        if prof is not None and prof.stale and not prof.extrapolated:
            if self.config.measure_missing:
                self.log(f"{self.store.path(key).name}: measured with other methods/models code, measuring again")
                prof = None
            else:
                self.log(f"warning: {self.store.path(key).name} was measured with other methods/models code")
        if (prof is None or prof.extrapolated) and proxy_key(key) is not None:  # too large to build here
            proxy = self.profile(proxy_key(key))
            prof = from_proxy(key, proxy)
            _carry_probe(prof, [proxy])
            self.log(f"extrapolated {key.model} {key.method} T={key.tokens} N={key.nodes} from {prof.basis[0].model}")
        elif prof is None or prof.extrapolated:
            if self.config.measure_missing and self.measurable(key):
                prof = self.measure(key)
            else:
                measured = self.store.measured(key, current=self.config.measure_missing)
                if self.config.measure_missing:
                    have = {(p.key.tokens, p.key.nodes) for p in measured}
                    measured += self.measure_many([b for b in self.basis(key) if (b.tokens, b.nodes) not in have])
                prof = extrapolate(key, measured)
                _carry_probe(prof, measured)
                self.log(f"extrapolated {key.model} {key.method} T={key.tokens} N={key.nodes} "
                         f"from {len(prof.basis)} measured profiles")
        self._profiles[key] = prof
        return prof

    def profiles_used(self) -> dict[ProfileKey, ComputeProfile]:
        """Every profile this simulator has looked up so far (for a run's record of its sources)."""
        return dict(self._profiles)

    def schedule(self, key: ProfileKey) -> Schedule:
        if key not in self._schedules:
            self._schedules[key] = Schedule.from_traces(self.profile(key).traces)
        return self._schedules[key]

    # -- one cell -------------------------------------------------------------------------
    def network(self, topology: Any, nodes: int, profile: LinkProfile) -> Network:
        """``topology``: a kind (star | mesh | line | shared_medium, any N), a SimTopology, or a
        testbed.net.topology.Topology (a name or path of a topology file is loaded as one)."""
        if isinstance(topology, SimTopology):
            check(topology.n_nodes == nodes, "nodes", nodes, f"{topology.n_nodes} (the SimTopology's)")
            return Network(SimTopology(topology.kind, nodes, profile))
        if isinstance(topology, str) and topology in KINDS:
            return Network(SimTopology(topology, nodes, profile))
        if isinstance(topology, (str, dict)):
            from testbed.net.topology import load_topology

            topology = load_topology(topology)
        return Network(topology, nodes, profile)

    def results(self, *, model: str, method: str, params: dict[str, Any] | None, tokens: int, nodes: int,
                topology: Any, profile: LinkProfile, speed: float | Sequence[float] = 1.0, repetitions: int = 1,
                threads: int = 1, batch: int = 1, first_repetition: int = 0,
                warm: bool | None = None, host_scale: float = 1.0) -> list[SimResult]:
        """``repetitions`` simulated inferences of one cell (per-rank results, aggregated into a row's
        columns by testbed.experiment.metrics.timing_columns, as measured ones are).

        Repetition r uses seed r for sampled loss and jitter; without loss or jitter all are equal.
        ``warm``: whether the connections carry the windows of an inference before (TcpModel.warm;
        None: the configured model's). ``host_scale``: multiplies compute, for a host slower (> 1) when
        the run being predicted measured than when it was calibrated (testbed.sim.validate.host_scale).
        A cell that cannot run (invalid method params, too many nodes for the heads, an unknown
        topology, no calibration) raises ConfigError naming the field.
        """
        check(isinstance(profile, LinkProfile), "profile", profile, "a testbed.net.profile.LinkProfile")
        check(isinstance(repetitions, int) and repetitions >= 1, "repetitions", repetitions, "an integer >= 1")
        check(isinstance(host_scale, (int, float)) and not isinstance(host_scale, bool) and host_scale > 0,
              "host_scale", host_scale, "a number > 0")
        key = self.key(model=model, method=method, params=params, tokens=tokens, nodes=nodes, topology=topology,
                       profile=profile, threads=threads, batch=batch)
        sched = self.schedule(key)
        stretch = contention_factor(self._profiles[key], self.config.shared_cpus) * self.config.compute_scale * host_scale
        if stretch != 1.0:
            speed = [f * stretch for f in speed] if not isinstance(speed, (int, float)) else speed * stretch
        net = self.network(topology, nodes, profile)
        k = self.config.segment_jitter_k
        reps = range(first_repetition, first_repetition + repetitions)
        extra = self.config.dispatch_s
        tcp = self.config.tcp if warm is None else replace(self.config.tcp, warm=warm)
        if k == 0:
            out = [simulate(sched, net, self.wire, tcp, speed, seed=r) for r in reps]
        else:
            factors = [float(speed)] * nodes if isinstance(speed, (int, float)) else [float(f) for f in speed]
            traces = self._profiles[key].traces
            out = [simulate(Schedule.from_traces(jittered(traces, factors, k, r)), net, self.wire, tcp, speed, seed=r)
                   for r in reps]
        return [replace(res, latency_s=res.latency_s + extra) for res in out] if extra else out

    def key(self, *, model: str, method: str, params: dict[str, Any] | None, tokens: int, nodes: int,
            topology: Any, profile: LinkProfile | None = None, threads: int = 1, batch: int = 1) -> ProfileKey:
        """The compute profile a cell runs on (its params settled for the topology and link profile,
        as ``results`` does)."""
        params = self.settle(model, method, params, tokens, nodes, batch, topology, profile)
        return ProfileKey.of(model, method, params, tokens, nodes, threads, batch)

    @staticmethod
    def settle(model: str, method: str, params: dict[str, Any] | None, tokens: int, nodes: int, batch: int,
               topology: Any, profile: LinkProfile | None = None) -> dict[str, Any]:
        """The method's params with the choices left to the run made for this topology and link
        profile (as the experiment runner does: e.g. tensor_parallel's ``auto`` all-reduce; None:
        links not shaped)."""
        from testbed.methods import METHODS, method_class
        from testbed.models import get_config

        if method not in METHODS:  # reported with the profile key's checks
            return dict(params or {})
        if isinstance(topology, SimTopology):
            topology = topology.kind
        if isinstance(topology, str) and topology in KINDS:
            flat = topology != "line" or nodes <= 2  # the line's middle links carry other pairs' traffic
        else:
            if isinstance(topology, (str, dict)):
                from testbed.net.topology import load_topology

                topology = load_topology(topology)
            flat = topology.is_flat(nodes) if hasattr(topology, "is_flat") else True  # network() names a bad one
        delay = profile.delay_ms if profile is not None else None
        return method_class(method).settle(dict(params or {}), get_config(model), tokens, nodes, batch, flat, delay)

    def mechanism(self, key: ProfileKey) -> str:
        """Where the compute times of ``key`` come from: sim/measured or sim/extrapolated."""
        return "sim/extrapolated" if self.profile(key).extrapolated else "sim/measured"
