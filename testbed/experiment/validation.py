"""Simulation against a `testbed run` results directory: testbed.sim.validate on its rows and traces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from testbed.errors import check
from testbed.experiment.manifest import read_manifest
from testbed.experiment.store import read_rows, read_traces
from testbed.sim.simulator import Simulator
from testbed.sim.validate import compare, save_validation


def emulation_cpus(run_dir: str | Path) -> int | None:
    """Cores of the machine a run was emulated on (its manifest), for ``SimConfig.shared_cpus``."""
    cpus = read_manifest(run_dir).get("machine", {}).get("cpu_count")
    return int(cpus) if isinstance(cpus, int) and cpus >= 1 else None


def validate_run(run_dir: str | Path, sim: Simulator, out_dir: str | Path | None = None,
                 topology: Any = None) -> tuple[pd.DataFrame, list[Path]]:
    """``compare`` on a results directory (rows and traces), saved beside it (validation/)."""
    d = Path(run_dir)
    rows = read_rows(d)
    check(len(rows) > 0, "run_dir", str(d), "a results directory with rows made by testbed run")
    table = compare(rows, sim, traces=read_traces(d), topology=topology)
    return table, save_validation(table, out_dir if out_dir is not None else d / "validation")
