"""Simulation against a `testbed run` results directory: testbed.sim.validate on its rows and traces.

The topology is the run's own: the experiment as resolved in its manifest (``config.topology``),
so a topology given inline in the experiment, or as a path, is simulated as it was emulated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from testbed.errors import ConfigError, check
from testbed.experiment.manifest import read_manifest
from testbed.experiment.spec import parse_spec
from testbed.experiment.store import read_rows, read_traces
from testbed.sim.network import KINDS
from testbed.sim.simulator import Simulator
from testbed.sim.validate import compare, save_validation


def emulation_cpus(run_dir: str | Path) -> int | None:
    """Cores of the machine a run was emulated on (its manifest), for ``SimConfig.shared_cpus``."""
    cpus = read_manifest(run_dir).get("machine", {}).get("cpu_count")
    return int(cpus) if isinstance(cpus, int) and cpus >= 1 else None


def run_topology(run_dir: str | Path) -> Any:
    """The topology a run used, from its manifest: a topology kind the simulator scales to any N
    (star | mesh | line | shared_medium, named so in the experiment), else the loaded topology with
    the experiment's devices (testbed.experiment.topology.experiment_topology)."""
    from testbed.experiment.topology import experiment_topology

    config = read_manifest(run_dir).get("config")
    check(isinstance(config, dict), "run_dir", str(run_dir),
          "a results directory with the manifest.json testbed run writes (it holds the experiment)")
    try:
        spec = parse_spec(config)
        if isinstance(spec.topology, str) and spec.topology in KINDS:
            return spec.topology
        return experiment_topology(spec)
    except ConfigError as e:
        raise ConfigError(f"manifest.json config ({e.field})", e.value, e.allowed) from None


def validate_run(run_dir: str | Path, sim: Simulator, out_dir: str | Path | None = None,
                 topology: Any = None) -> tuple[pd.DataFrame, list[Path]]:
    """``compare`` on a results directory (rows and traces), saved beside it (validation/);
    ``topology``: instead of the run's own (``run_topology``)."""
    d = Path(run_dir)
    rows = read_rows(d)
    check(len(rows) > 0, "run_dir", str(d), "a results directory with rows made by testbed run")
    topo = topology if topology is not None else run_topology(d)
    table = compare(rows, sim, traces=read_traces(d), topology=topo)
    return table, save_validation(table, out_dir if out_dir is not None else d / "validation")
