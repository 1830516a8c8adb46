"""The experiment file: a typed, validated description of one sweep.

``load_spec(path)`` reads an experiment YAML and returns an ``ExperimentSpec``,
or raises ONE ``ConfigError`` naming the YAML path of the bad field
(``methods[2].params.groups``), the value and what is allowed. Unknown keys are
errors. Loading writes nothing. ``check_spec`` (checks.py) then validates what
needs other packages (model names, method params, topology files) before a run
creates its output directory, so that a sweep does not fail late.

Schema (units in the names; see experiments/quickstart.yaml for a full example)::

    name: quickstart                 # [A-Za-z0-9._-]+, names the output directory
    description: ...                 # optional
    model: {name: vit-small, weights_path: null, codebook_path: null, dataset: null}
    input: {tokens: 197, batch: 1, seed: 0}
    methods:                         # each: name, optional params, optional label
      - {name: single}
      - {name: astra, params: {groups: 1, codebook_size: 1024}}
    nodes: {count: 4, threads: 1, device: {speed: 1.0}, memory_mb: null}
                                     # speed: of each device core, in cores of this host (0.25: 4x slower);
                                     # null device: the topology hosts' own (default speed 1.0)
    topology: star                   # a file topologies/<name>.yaml, a path to one, or an inline mapping
    sweep:                           # a grid (every combination) ...
      bandwidth_mbps: [10, 50, 200]  # null = unshaped
      delay_ms: [0]                  # one way, per link
      jitter_ms: [0]
      loss_pct: [0]
      # ... or `profiles: [{bandwidth_mbps: 10, delay_ms: 5}, ...]`, plus optional
      # `traces: [{name, points: [[time_s, bandwidth_mbps], ...] | path, delay_ms, loss_pct}]`
    repetitions: 3                   # measured inferences per method and cell
    faults:                          # optional: events at device times after each method's repetitions
      - {kind: link_down, link: [h2, s1], at_s: 1, duration_s: 2}   # start (testbed.experiment.faults)
    warmup: 1                        # unmeasured inferences before them
    backend: mininet                 # inprocess | loopback | mininet | sim | devices
    devices: lab.yaml                # backend devices only (required there): node servers already running
                                     # on real machines, an inventory file or inline (testbed.experiment.inventory);
                                     # `topology` is then mesh or left out (every pair of devices gets the
                                     # cell's profile, host to host)
    output_dir: null                 # default results/<name>-<YYYYmmdd-HHMMSS>
    emulation: {time_dilation: auto, reserve_cores: 0.5, cpu_slice_ms: 10, pace_compute: true}
                                     # mininet: run F times slower than real time so that every node
                                     # gets its whole device (auto: the smallest such F; 1: no
                                     # dilation, nodes contend for the host's cores); durations are
                                     # recorded divided by F; pace_compute: hold each compute segment
                                     # to its CPU time at the device's rate (a quota refilled during a
                                     # wait would run the next segment at host speed);
                                     # network_core (false): keep a whole host core for the
                                     # network (delay lines, receive processing), no device on it
    timeout_s: 600                   # deadline of one inference (and of loading a job)
    fidelity_s: 1.0                  # mininet: iperf3 seconds per distinct path when a cell starts
                                     # (goodput and ping RTT vs configured, into the manifest); 0: off
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from testbed.backends import BACKENDS as BACKEND_REGISTRY
from testbed.backends.inventory import Inventory
from testbed.errors import ConfigError, check
from testbed.experiment import fields as F
from testbed.experiment.faults import FaultSpec, parse_faults
from testbed.net.profile import LinkProfile
from testbed.yamlfile import read_yaml

BACKENDS = tuple(BACKEND_REGISTRY)  # the names of the backend registry
LINK_AXES = ("bandwidth_mbps", "delay_ms", "jitter_ms", "loss_pct")
#: backends that run the real method but cannot shape links
UNSHAPED_BACKENDS = ("inprocess", "loopback")
NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
#: the one topology of backend devices: every ordered pair of devices gets the cell's profile
DEVICES_TOPOLOGY = "mesh"


@dataclass(frozen=True)
class ModelSpec:
    name: str  # named config (testbed.models.CONFIGS)
    weights_path: str | None = None  # HF safetensors file or directory; None: seeded random weights
    codebook_path: str | None = None  # trained astra codebooks; None: the runner calibrates them per (G, K)
    dataset: str | None = None  # evaluation split (testbed.models.datasets) used as the input batch


@dataclass(frozen=True)
class InputSpec:
    tokens: int  # ViT: patches + CLS; GPT-2: prompt length
    batch: int = 1
    seed: int = 0  # weights (no weights_path) and input
    generate: int = 0  # causal LMs: tokens to decode after prefill (testbed.methods.decode); 0: prefill only


@dataclass(frozen=True)
class MethodSpec:
    name: str  # one of testbed.methods.METHODS
    params: dict[str, Any] = field(default_factory=dict)
    label: str = ""  # legend text; default: name and params

    @property
    def params_json(self) -> str:
        return json.dumps(self.params, sort_keys=True)

    @property
    def display(self) -> str:
        """Legend text: the label, else the name and params (astra's G and K first, as in the paper)."""
        if self.label:
            return self.label
        p = dict(self.params)
        short = [f"{s}={p.pop(k)}" for k, s in (("groups", "G"), ("codebook_size", "K")) if k in p]
        return " ".join([self.name, *short, *(f"{k}={v}" for k, v in sorted(p.items()))])


@dataclass(frozen=True)
class NodesSpec:
    count: int  # N ranks, one node each
    threads: int = 1  # torch intra-op threads per node, and cores of its device
    speed: float | None = None  # nodes.device.speed: per device core, in cores of this host; None: the topology's
    memory_mb: int | None = None  # memory limit per node (mininet only); None: no limit


MAX_DILATION = 1000.0


@dataclass(frozen=True)
class EmulationSpec:
    """How emulated time relates to real time (mininet backend)."""

    time_dilation: float | str = "auto"  # "auto" or a factor >= 1
    reserve_cores: float = 0.5  # host cores auto leaves to delay lines, the orchestrator and the kernel
    cpu_slice_ms: float = 10.0  # CPU time per CFS period of each device core (see testbed.net.cgroups)
    pace_compute: bool = True  # nodes under a quota hold compute segments to device time (testbed.comm.trace.CpuPacer)
    #: a whole host core kept for the network: the delay lines run on it, every emulated interface's receive
    #: processing is steered to it and no device is pinned to it (testbed.net.emulation, ``network_cpu``)
    network_core: bool = False


@dataclass(frozen=True)
class TraceSpec:
    """A bandwidth trace replayed on every shaped link while a cell runs (starts with its first warm-up)."""

    name: str
    points: tuple[tuple[float, float], ...] = ()  # (time_s, bandwidth_mbps), time strictly increasing from 0
    path: str | None = None  # CSV time_s,bandwidth_mbps or a Mahimahi trace (instead of points)
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    loop: bool = True  # start over at the end of the trace


@dataclass(frozen=True)
class Cell:
    """One point of the sweep: a fixed link profile, or a trace replayed while the cell runs."""

    index: int
    profile: LinkProfile
    trace: TraceSpec | None = None


@dataclass(frozen=True)
class SweepSpec:
    grid: dict[str, tuple] | None = None  # axis -> values (combined as a grid)
    profiles: tuple[LinkProfile, ...] = ()  # explicitly listed profiles (instead of grid)
    traces: tuple[TraceSpec, ...] = ()

    def cells(self) -> list[Cell]:
        if self.grid is not None:
            axes = [self.grid.get(a, (None,) if a == "bandwidth_mbps" else (0.0,)) for a in LINK_AXES]
            profiles = [LinkProfile(*combo) for combo in itertools.product(*axes)]
        else:
            profiles = list(self.profiles)
        cells = [Cell(i, p) for i, p in enumerate(profiles)]
        for t in self.traces:
            cells.append(Cell(len(cells), LinkProfile(None, t.delay_ms, t.jitter_ms, t.loss_pct), t))
        return cells


@dataclass(frozen=True)
class ExperimentSpec:
    name: str
    model: ModelSpec
    input: InputSpec
    methods: tuple[MethodSpec, ...]
    nodes: NodesSpec
    topology: str | dict  # name of topologies/<name>.yaml, a path to a YAML file, or an inline mapping
    sweep: SweepSpec = field(default_factory=SweepSpec)
    repetitions: int = 3
    warmup: int = 1
    backend: str = "mininet"
    output_dir: str | None = None
    timeout_s: float = 600.0
    fidelity_s: float = 1.0  # mininet: iperf3 seconds per distinct path measured at each cell's start; 0: off
    description: str = ""
    emulation: EmulationSpec = field(default_factory=EmulationSpec)
    faults: tuple[FaultSpec, ...] = ()  # replayed in every unit from its repetitions' start
    devices: Inventory | None = None  # backend devices: the node servers on real machines, in rank order

    def cells(self) -> list[Cell]:
        return self.sweep.cells()

    @property
    def topology_name(self) -> str:
        if isinstance(self.topology, dict):
            return str(self.topology.get("name", "inline"))
        return Path(self.topology).stem

    def to_dict(self) -> dict:
        """The resolved experiment as a mapping that ``parse_spec`` reads back to an equal spec."""
        sweep: dict[str, Any] = {}
        if self.sweep.grid is not None:
            sweep.update({a: list(v) for a, v in self.sweep.grid.items()})
        else:
            sweep["profiles"] = [{k: v for k, v in p.to_dict().items() if v is not None or k == "bandwidth_mbps"}
                                 for p in self.sweep.profiles]
        if self.sweep.traces:
            sweep["traces"] = [_trace_dict(t) for t in self.sweep.traces]
        return {
            "name": self.name, **({"description": self.description} if self.description else {}),
            "model": {k: v for k, v in asdict(self.model).items() if v is not None},
            "input": asdict(self.input),
            "methods": [{"name": m.name, "params": dict(m.params), **({"label": m.label} if m.label else {})}
                        for m in self.methods],
            "nodes": _nodes_dict(self.nodes), "topology": self.topology, "sweep": sweep,
            "repetitions": self.repetitions, "warmup": self.warmup, "backend": self.backend,
            "output_dir": self.output_dir, "timeout_s": self.timeout_s, "fidelity_s": self.fidelity_s,
            "emulation": asdict(self.emulation),
            **({"faults": [f.to_dict() for f in self.faults]} if self.faults else {}),
            **({"devices": self.devices.to_dict()} if self.devices is not None else {}),
        }


def _nodes_dict(n: NodesSpec) -> dict:
    d: dict[str, Any] = {"count": n.count, "threads": n.threads, "memory_mb": n.memory_mb}
    if n.speed is not None:
        d["device"] = {"speed": n.speed}
    return d


def _trace_dict(t: TraceSpec) -> dict:
    d: dict[str, Any] = {"name": t.name}
    if t.path:
        d["path"] = t.path
    else:
        d["points"] = [list(p) for p in t.points]
    d.update(delay_ms=t.delay_ms, jitter_ms=t.jitter_ms, loss_pct=t.loss_pct, loop=t.loop)
    return d


# --------------------------------------------------------------------------- reading
def load_spec(path: str | Path, backend: str | None = None) -> ExperimentSpec:
    """Read and validate an experiment file (``backend`` overrides the file's). Writes nothing."""
    p = Path(path)
    check(p.is_file(), "experiment file", str(path), "an existing YAML file")
    data = read_yaml(p)
    if backend is not None and isinstance(data, dict):
        data = {**data, "backend": backend}
    return parse_spec(data, base_dir=p.resolve().parent)


def parse_spec(data: Any, base_dir: str | Path | None = None) -> ExperimentSpec:
    """Validate a mapping (an experiment file's content) into an ExperimentSpec. ``base_dir``: where
    the file lies, the start of its relative ``devices`` paths (None: the current directory)."""
    d = F.mapping(data, "", {"name": True, "description": False, "model": True, "input": True, "methods": True,
                             "nodes": True, "topology": False, "sweep": False, "repetitions": False, "warmup": False,
                             "backend": False, "output_dir": False, "timeout_s": False, "fidelity_s": False,
                             "emulation": False, "faults": False, "devices": False})
    name = F.string(d["name"], "name")
    check(bool(NAME_RE.match(name)), "name", name, "letters, digits, '.', '_' and '-' only (it names a directory)")
    backend = F.string(d.get("backend", "mininet"), "backend", BACKENDS)
    nodes = _nodes(d["nodes"], "nodes")
    devices = _devices(d, backend, nodes.count, Path(base_dir) if base_dir is not None else Path.cwd())
    spec = ExperimentSpec(
        name=name,
        description=F.optional(d.get("description"), F.string, "description") or "",
        model=_model(d["model"], "model"),
        input=_input(d["input"], "input"),
        methods=_methods(d["methods"], "methods"),
        nodes=nodes,
        topology=_topology(d.get("topology"), "topology", backend),
        sweep=_sweep(d.get("sweep"), "sweep"),
        repetitions=F.integer(d.get("repetitions", 3), "repetitions", 1),
        warmup=F.integer(d.get("warmup", 1), "warmup", 0),
        backend=backend,
        output_dir=F.optional(d.get("output_dir"), F.string, "output_dir"),
        timeout_s=F.number(d.get("timeout_s", 600.0), "timeout_s", 0, 86400, lo_open=True),
        fidelity_s=F.number(d.get("fidelity_s", 1.0), "fidelity_s", 0, 60),
        emulation=_emulation(d.get("emulation"), "emulation"),
        faults=parse_faults(d.get("faults")),
        devices=devices,
    )
    # iperf3 is run with -O 1 (the first second not counted): shorter runs never end
    check(spec.fidelity_s == 0 or spec.fidelity_s >= 1, "fidelity_s", spec.fidelity_s, "0 (off) or a number in [1, 60]")
    _check_backend_fit(spec)
    return spec


def _model(v: Any, path: str) -> ModelSpec:
    if isinstance(v, str):  # shorthand: `model: vit-tiny`
        v = {"name": v}
    d = F.mapping(v, path, {"name": True, "weights_path": False, "codebook_path": False, "dataset": False})
    return ModelSpec(
        name=F.string(d["name"], F.join(path, "name")),
        weights_path=F.optional(d.get("weights_path"), _existing_path, F.join(path, "weights_path")),
        codebook_path=F.optional(d.get("codebook_path"), _existing_path, F.join(path, "codebook_path"), True),
        dataset=F.optional(d.get("dataset"), F.string, F.join(path, "dataset")),
    )


def _existing_path(v: Any, path: str, file_only: bool = False) -> str:
    """An existing file (or directory); stored absolute so that node processes find it from anywhere."""
    F.string(v, path)
    p = Path(v).expanduser()
    check(p.is_file() or (not file_only and p.is_dir()), path, v,
          "an existing file" + ("" if file_only else " or directory") + " (relative paths start at the current directory)")
    return str(p.resolve())


def _input(v: Any, path: str) -> InputSpec:
    d = F.mapping(v, path, {"tokens": True, "batch": False, "seed": False, "generate": False})
    return InputSpec(tokens=F.integer(d["tokens"], F.join(path, "tokens"), 1),
                     batch=F.integer(d.get("batch", 1), F.join(path, "batch"), 1),
                     seed=F.integer(d.get("seed", 0), F.join(path, "seed"), 0),
                     generate=F.integer(d.get("generate", 0), F.join(path, "generate"), 0))


def _methods(v: Any, path: str) -> tuple[MethodSpec, ...]:
    out = []
    for i, m in enumerate(F.seq(v, path, "methods, e.g. {name: astra, params: {groups: 1}}")):
        mp = F.join(path, i)
        if isinstance(m, str):  # shorthand: `- single`
            m = {"name": m}
        d = F.mapping(m, mp, {"name": True, "params": False, "label": False})
        params = d.get("params") or {}
        check(isinstance(params, dict), F.join(mp, "params"), params, "a mapping of parameter names to values")
        for k in params:
            check(isinstance(k, str), F.join(mp, "params"), k, "string parameter names")
        out.append(MethodSpec(F.string(d["name"], F.join(mp, "name")), dict(params),
                              F.optional(d.get("label"), F.string, F.join(mp, "label")) or ""))
    seen: dict[tuple[str, str], int] = {}
    for i, m in enumerate(out):
        key = (m.name, m.params_json)
        check(key not in seen, F.join(path, i), m.display, f"each method and params once (same as methods[{seen.get(key)}])")
        seen[key] = i
    return tuple(out)


def _nodes(v: Any, path: str) -> NodesSpec:
    from testbed.net.topology import CPU_SHARE_MIGRATION, MAX_SPEED

    if F.is_int(v):  # shorthand: `nodes: 4`
        v = {"count": v}
    if isinstance(v, dict) and "cpu_share" in v:
        if v["cpu_share"] is not None:
            raise ConfigError(F.join(path, "cpu_share"), v["cpu_share"],
                              CPU_SHARE_MIGRATION.replace("`speed`", "`nodes.device.speed`", 1))
        v = {k: x for k, x in v.items() if k != "cpu_share"}  # null, as run directories made before wrote it
    d = F.mapping(v, path, {"count": True, "threads": False, "device": False, "memory_mb": False})
    dp = F.join(path, "device")
    dev = F.mapping(d.get("device") or {}, dp, {"speed": False})
    return NodesSpec(count=F.integer(d["count"], F.join(path, "count"), 1, 64),
                     threads=F.integer(d.get("threads", 1), F.join(path, "threads"), 1, 256),
                     speed=F.optional(dev.get("speed"), F.number, F.join(dp, "speed"), 0, MAX_SPEED, lo_open=True),
                     memory_mb=F.optional(d.get("memory_mb"), F.integer, F.join(path, "memory_mb"), 16))


def _emulation(v: Any, path: str) -> EmulationSpec:
    d = F.mapping(v if v is not None else {}, path,
                  {"time_dilation": False, "reserve_cores": False, "cpu_slice_ms": False, "pace_compute": False,
                   "network_core": False})
    tp = F.join(path, "time_dilation")
    td = d.get("time_dilation", "auto")
    if td != "auto":
        check(F.is_number(td) and 1 <= td <= MAX_DILATION, tp, td,
              f"auto, or a number in [1, {MAX_DILATION:g}] (1: no dilation; F: run F times slower than real time)")
        td = float(td)
    return EmulationSpec(time_dilation=td,
                         reserve_cores=F.number(d.get("reserve_cores", 0.5), F.join(path, "reserve_cores"), 0, 64),
                         cpu_slice_ms=F.number(d.get("cpu_slice_ms", 10.0), F.join(path, "cpu_slice_ms"), 0.5, 1000),
                         pace_compute=_bool(d.get("pace_compute", True), F.join(path, "pace_compute")),
                         network_core=_bool(d.get("network_core", False), F.join(path, "network_core")))


def _topology(v: Any, path: str, backend: str) -> str | dict:
    if backend == "devices":  # real devices are where they are: one profile between every pair of them
        check(v in (None, DEVICES_TOPOLOGY), path, v,
              f"{DEVICES_TOPOLOGY} or no `topology` with backend devices (the cell's link profile applies to every "
              "ordered pair of devices, host to host, as in topologies/mesh.yaml)")
        return DEVICES_TOPOLOGY
    check(v is not None, path, v, "this field is required (a topology; only backend devices goes without one)")
    check(isinstance(v, (str, dict)) and v != "", path, v,
          "the name of a file in topologies/ (e.g. star), a path to a topology YAML, or an inline mapping")
    return v


def _devices(d: dict, backend: str, count: int, base_dir: Path) -> Inventory | None:
    """The inventory of backend devices: required there, refused with any other backend."""
    from testbed.experiment.inventory import parse_devices

    v = d.get("devices")
    if backend != "devices":
        check(v is None, "devices", v, f"no `devices` with backend {backend} (an inventory of node servers on real "
              "machines is for `backend: devices`)")
        return None
    check(v is not None, "devices", v, "an inventory with backend devices: a path to an inventory YAML file or an "
          "inline mapping with `nodes: [{name, address: HOST:PORT}, ...]` (nodes.count entries, in rank order)")
    return parse_devices(v, count, base_dir)


def _sweep(v: Any, path: str) -> SweepSpec:
    if v is None:
        return SweepSpec(grid={})  # one unshaped cell
    d = F.mapping(v, path, {**{a: False for a in LINK_AXES}, "profiles": False, "traces": False})
    axes = {a: d[a] for a in LINK_AXES if a in d}
    if "profiles" in d and axes:
        raise ConfigError(F.join(path, next(iter(axes))), axes[next(iter(axes))],
                          "either grid axes (bandwidth_mbps, delay_ms, ...) or `profiles`, not both")
    traces = tuple(_trace(t, F.join(F.join(path, "traces"), i))
                   for i, t in enumerate(F.seq(d["traces"], F.join(path, "traces"), "traces"))) if "traces" in d else ()
    if "profiles" in d:
        items = F.seq(d["profiles"], F.join(path, "profiles"), "link profiles, e.g. {bandwidth_mbps: 10, delay_ms: 5}")
        return SweepSpec(profiles=tuple(_profile(p, F.join(F.join(path, "profiles"), i)) for i, p in enumerate(items)),
                         traces=traces)
    grid = {}
    for a, values in axes.items():
        ap = F.join(path, a)
        grid[a] = tuple(F.seq(values if isinstance(values, list) else [values], ap, f"{a} values"))
        for i, x in enumerate(grid[a]):  # each value alone must make a valid profile (jitter: against any delay)
            _profile({a: x, **({"delay_ms": 1e9} if a == "jitter_ms" else {})}, "", F.join(ap, i))
        check(len(set(grid[a])) == len(grid[a]), ap, values, "distinct values")
    grid = {a: tuple(None if x is None else float(x) for x in vs) for a, vs in grid.items()}
    if traces and not axes:
        return SweepSpec(grid=None, profiles=(), traces=traces)
    sweep = SweepSpec(grid=grid, traces=traces)
    try:  # combinations: LinkProfile checks jitter_ms <= delay_ms
        sweep.cells()
    except ConfigError as e:
        raise F.rebase(e, path) from None
    return sweep


def _profile(v: Any, path: str, value_path: str | None = None) -> LinkProfile:
    """A LinkProfile from a mapping; its own validation errors are re-rooted at ``path`` (or ``value_path``)."""
    if value_path is None:
        F.mapping(v, path, {a: False for a in LINK_AXES} | {"queue_packets": False})
    try:
        return LinkProfile(**v)
    except ConfigError as e:
        raise (ConfigError(value_path, e.value, e.allowed) if value_path else F.rebase(e, path)) from None
    except TypeError:
        raise ConfigError(value_path or path, v, "numbers for " + ", ".join(LINK_AXES)) from None


def _trace(v: Any, path: str) -> TraceSpec:
    d = F.mapping(v, path, {"name": True, "points": False, "path": False, "delay_ms": False, "jitter_ms": False,
                            "loss_pct": False, "loop": False})
    name = F.string(d["name"], F.join(path, "name"))
    check(("points" in d) != ("path" in d), path, sorted(d), "exactly one of `points` or `path`")
    points: list[tuple[float, float]] = []
    if "points" in d:
        pp = F.join(path, "points")
        for i, pt in enumerate(F.seq(d["points"], pp, "[time_s, bandwidth_mbps] pairs", 1)):
            ip = F.join(pp, i)
            check(isinstance(pt, list) and len(pt) == 2, ip, pt, "a pair [time_s, bandwidth_mbps]")
            t = F.number(pt[0], F.join(ip, 0), 0)
            bw = F.number(pt[1], F.join(ip, 1), 0, lo_open=True)
            _profile({"bandwidth_mbps": bw}, "", F.join(ip, 1))
            check(i > 0 or t == 0, F.join(ip, 0), pt[0], "0 for the first point")
            check(i == 0 or t > points[-1][0], F.join(ip, 0), pt[0], "a time after the previous point's")
            points.append((t, bw))
    base = _profile({a: d[a] for a in ("delay_ms", "jitter_ms", "loss_pct") if a in d}, path)
    return TraceSpec(name=name, points=tuple(points),
                     path=F.optional(d.get("path"), _existing_path, F.join(path, "path"), True),
                     delay_ms=base.delay_ms, jitter_ms=base.jitter_ms, loss_pct=base.loss_pct,
                     loop=_bool(d.get("loop", True), F.join(path, "loop")))


def _bool(v: Any, path: str) -> bool:
    check(isinstance(v, bool), path, v, "true or false")
    return v


def _check_backend_fit(spec: ExperimentSpec) -> None:
    """Settings a backend cannot honour are errors, never silently ignored."""
    b = spec.backend
    if b in UNSHAPED_BACKENDS:
        for c in spec.cells():
            if c.trace is not None:
                raise ConfigError("sweep.traces", c.trace.name, f"no traces with backend {b} (it cannot shape links); "
                                  "use backend mininet")
            shaped = {a: getattr(c.profile, a) for a in LINK_AXES if getattr(c.profile, a) not in (None, 0.0)}
            if shaped:
                a = next(iter(shaped))
                raise ConfigError(f"sweep.{a}", shaped[a], f"null/0 only with backend {b} (it cannot shape links); "
                                  "use backend mininet (root) or sim")
    if b in ("sim", "devices"):
        check(not spec.sweep.traces, "sweep.traces", [t.name for t in spec.sweep.traces],
              f"none with backend {b} (it applies fixed link profiles); use backend mininet")
    limits = {"speed": ("device.speed", ("mininet", "sim")), "memory_mb": ("memory_mb", ("mininet",))}
    for f, (name, backends) in limits.items():
        val = getattr(spec.nodes, f)
        check(val is None or b in backends, f"nodes.{name}", val,
              f"null with backend {b} (only {' and '.join(backends)} model a node's {name})")
    td = spec.emulation.time_dilation
    check(td in ("auto", 1.0) or b == "mininet", "emulation.time_dilation", td,
          f"auto or 1 with backend {b} (only mininet dilates time; {b} runs in real time)")


def with_output_dir(spec: ExperimentSpec, out: str) -> ExperimentSpec:
    return replace(spec, output_dir=out)
