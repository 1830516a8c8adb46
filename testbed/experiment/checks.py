"""Validation of an experiment against the rest of the testbed, before any measurement.

``load_spec`` checks the file's shape and ranges; ``check_spec`` checks what needs the
other packages: the model name and token count, the dataset, the topology file and its
host count, the scheduled faults' links and hosts, and every method's params -- by building each method for real (ranks 0 and
N-1, the real model, the real codebooks) with the methods' own validation, so a sweep
never fails late on a bad parameter. Errors are re-rooted at the experiment's YAML path
(``methods[2].params.groups``). The model, topology, dilation and astra codebook files made
here are handed to the runner (``Prepared``), so the work is not done twice.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from testbed.errors import ConfigError, check
from testbed.experiment import fields as F
from testbed.experiment.codebooks import Codebooks
from testbed.experiment.startup import Startup
from testbed.experiment.spec import ExperimentSpec, MethodSpec


@dataclass
class Prepared:
    """What validation built and the runner reuses."""

    model: Any  # the unsharded model (reference output, calibration)
    codebooks: Codebooks
    topology: Any = None  # testbed.net.topology.Topology (mininet, sim)
    dilation: Any = None  # testbed.experiment.dilation.Dilation: the run's time-dilation factor
    machine: Any = None  # what the backend's availability check found (mininet: the kernel probe)
    startup: Startup | None = None  # the run's start-up clock (model build and calibration timed here)


def check_spec(spec: ExperimentSpec, codebook_dir: Path | None = None,
               log: Callable[[str], None] | None = None, startup: Startup | None = None) -> Prepared:
    """Raise ONE ConfigError (YAML path, value, allowed) if the experiment cannot run.

    ``codebook_dir``: the run's codebook directory. Codebooks the astra checks fit are written
    there once and the runner hands those very files to the nodes; files already there (an
    earlier session, --resume) are used as they are. If the check fails, every directory it
    created is removed again, so a refused experiment leaves nothing behind. None: the checks'
    codebook files go to a temporary directory (nothing is written), the fitted codebooks stay
    in memory for a runner to write. ``log``: told about slow steps (k-means takes minutes at
    paper scale).
    """
    from testbed.backends import backend_class
    from testbed.experiment.dilation import resolve_dilation

    startup = startup or Startup()
    computes = backend_class(spec.backend).computes
    with startup.phase("model build"):
        model = _check_model(spec, build=computes or spec.model.weights_path is not None)
    topology = _check_topology(spec)
    _check_faults(spec, topology)
    dilation = resolve_dilation(spec, topology)
    machine = _check_backend_available(spec)
    log = log or (lambda _msg: None)
    if model is None:  # nothing computes: the methods' stated schedules hold every check of sizes and params
        _check_methods(spec, None, None, log, startup)
        cbs = Codebooks(spec, None)
    elif codebook_dir is None:
        with tempfile.TemporaryDirectory(prefix="testbed-check-") as tmp:
            cbs = Codebooks(spec, model, directory=Path(tmp))
            _check_methods(spec, model, cbs, log, startup)
        cbs.directory = None  # the temporary files are gone; the fitted tensors are kept
    else:
        created = _missing_ancestor(Path(codebook_dir))
        cbs = Codebooks(spec, model, directory=Path(codebook_dir))
        try:
            _check_methods(spec, model, cbs, log, startup)
        except BaseException:
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            raise
    return Prepared(model, cbs, topology, dilation, machine, startup)


def _missing_ancestor(path: Path) -> Path | None:
    """The top-most directory of ``path`` that does not exist yet (what writing into it creates)."""
    top = None
    for p in [path, *path.parents]:
        if p.exists():
            break
        top = p
    return top


def _check_model(spec: ExperimentSpec, build: bool = True):
    """The experiment's model, built (weights loaded) when ``build``, else None after the config's checks
    (a backend that computes nothing, the simulator, needs no weights: Llama-3-8B does not fit here)."""
    from testbed.models import CONFIGS, build_model

    m = spec.model
    check(m.name in CONFIGS, "model.name", m.name, " | ".join(CONFIGS))
    cfg = CONFIGS[m.name]
    t = spec.input.tokens
    if cfg.kind == "vit":
        check(t >= 2, "input.tokens", t, f"an integer >= 2 for {m.name} (patches + CLS)")
    else:
        check(t <= cfg.max_positions, "input.tokens", t, f"an integer in [1, {cfg.max_positions}] for {m.name}")
    if m.dataset is not None:
        from testbed.models.datasets import SPLITS

        check(m.dataset in SPLITS, "model.dataset", m.dataset, " | ".join(SPLITS))
    if not build:
        return None
    try:
        return build_model(m.name, seed=spec.input.seed, weights_path=m.weights_path)
    except ConfigError as e:
        raise ConfigError("model.weights_path", m.weights_path, f"weights for {m.name} ({e})") from None


def _check_topology(spec: ExperimentSpec):
    """The topology must exist and parse; emulated and simulated runs need one host per node."""
    from testbed.experiment.topology import spec_topology
    from testbed.net.topology import TOPOLOGY_DIR, load_topology

    if spec.backend == "devices":  # its own: a mesh of the inventory's devices
        return spec_topology(spec)
    src = spec.topology
    if isinstance(src, str) and not Path(src).suffix:
        names = sorted(p.stem for p in TOPOLOGY_DIR.glob("*.yaml"))
        check(src in names, "topology", src, " | ".join(names) + " (files in topologies/), a YAML path, or a mapping")
    try:
        topo = load_topology(src)
    except ConfigError as e:
        raise (F.rebase(e, "topology") if not e.field.startswith("topology") else e) from None
    for i, t in enumerate(spec.sweep.traces):
        from testbed.experiment.topology import bandwidth_trace

        bandwidth_trace(t, f"sweep.traces[{i}]")
    from testbed.sim.network import KINDS

    sim_kind = spec.backend == "sim" and isinstance(src, str) and src in KINDS  # the simulator scales these to N
    if spec.backend in ("mininet", "sim") and not sim_kind:
        n = len(topo.hosts)
        check(n == spec.nodes.count, "nodes.count", spec.nodes.count,
              f"{n}, the number of hosts of topology {topo.name!r} (one node per host)")
    return topo


def _check_faults(spec: ExperimentSpec, topology) -> None:
    """Scheduled faults name links and hosts of the topology, and the backend can inject their kinds."""
    if not spec.faults:
        return
    from testbed.backends import BACKENDS, backend_class
    from testbed.experiment.faults import check_faults

    check_faults(spec.faults, topology, spec.nodes.count, spec.backend,
                 {b: backend_class(b).FAULTS for b in BACKENDS}, bool(spec.sweep.traces))


def _check_backend_available(spec: ExperimentSpec) -> Any:
    """A backend this machine cannot run (mininet without root, its API or a shaping mechanism) is named
    before anything is written; returns what the check learnt about the machine."""
    from testbed.backends import backend_class
    from testbed.net.probe import EmulationUnavailable

    try:
        return backend_class(spec.backend).check_available()
    except EmulationUnavailable as e:
        raise ConfigError("backend", spec.backend, f"a machine that can emulate ({e}); or run without root with "
                          "`--backend sim` (simulated links) or `--backend loopback` (unshaped profiles only)") from None


def _check_methods(spec: ExperimentSpec, model, cbs: Codebooks | None, log: Callable[[str], None],
                   startup: Startup) -> None:
    """Build ranks 0 and N-1 of every method on ``model`` (astra: with its codebooks); ``model`` None:
    only each method's stated schedule (params, sizes), nothing built."""
    from testbed.comm.inprocess import InProcessGroup
    from testbed.methods import METHODS, build_method, comm_schedule, resolve_params
    from testbed.models import get_config

    N, T = spec.nodes.count, spec.input.tokens
    cfg = get_config(spec.model.name) if model is None else model.cfg
    for i, m in enumerate(spec.methods):
        check(m.name in METHODS, f"methods[{i}].name", m.name, " | ".join(METHODS))
    if spec.input.generate:
        from testbed.methods.decode import check_decodes

        for m in spec.methods:
            try:
                check_decodes(m.name, cfg, spec.input.generate)
            except ConfigError as e:
                raise ConfigError("input.generate", e.value, e.allowed) from None
        # the simulator's compute profiles are of prefill: no per-token compute to replay decode with
        check(spec.backend != "sim", "input.generate", spec.input.generate,
              "0 with backend sim (its compute profiles cover prefill only; decode runs on inprocess, loopback "
              "and mininet)")
    if model is None:
        for i, m in enumerate(spec.methods):
            try:
                comm_schedule(m.name, cfg, T, N, dict(m.params), spec.input.batch)
            except ConfigError as e:
                raise _method_error(e, i, m) from None
        return
    # cheap ones first: an error in any other method is reported before minutes of k-means
    order = sorted(range(len(spec.methods)), key=lambda i: spec.methods[i].name == "astra")
    for i in order:
        m = spec.methods[i]
        group = InProcessGroup(N, timeout_s=1.0)
        try:
            path = None
            if m.name == "astra":
                resolve_params("astra", m.params, model.cfg)  # bad params fail before any k-means is spent
                if not cbs.trained():
                    log(f"checking methods[{i}] ({m.display}): its codebooks (fit once, then from the user cache)")
                with startup.phase("calibration"):
                    path = cbs.file(m.params)
            for rank in sorted({0, N - 1}):  # building does not communicate
                build_method(m.name, model, dict(m.params), rank, N, group.communicator(rank), tokens=T,
                             codebook_path=path)
        except ConfigError as e:
            raise _method_error(e, i, m) from None


def _method_error(e: ConfigError, i: int, m: MethodSpec) -> ConfigError:
    """A method's own error, placed at the YAML field the user has to change."""
    from testbed.methods import method_class

    base = f"methods[{i}].params"
    if e.field == "params":  # unknown key: the value is the key's name
        return ConfigError(f"{base}.{e.value}", m.params.get(e.value), e.allowed)
    if e.field in m.params or e.field in method_class(m.name).DEFAULTS:
        return ConfigError(f"{base}.{e.field}", e.value, e.allowed)
    where = {"world_size": "nodes.count", "tokens": "input.tokens", "codebook_path": "model.codebook_path"}
    return ConfigError(where.get(e.field, f"methods[{i}] ({e.field})"), e.value, f"{e.allowed} (method {m.name})")
