"""The Python API: load or build an experiment in code, run it on any backend, get its rows.

For notebooks and scripts; `testbed run` is a thin layer over the same two steps (``check``,
``measure``)::

    from testbed.experiment import api

    exp = api.experiment("experiments/quickstart.yaml", backend="sim", repetitions=1)
    run = api.run(exp, out="results/nb-quickstart")
    run.rows            # pandas DataFrame, one row per repetition (results/README.md lists the columns)
    run.summary()       # medians and speed-ups per configuration and method (testbed.experiment.report)
    run.dir             # the run directory: rows.csv, rows.parquet, manifest.json, plots/, report.html

A sharded sweep (testbed.experiment.shard): ``api.run(exp, out=..., shard="1/4")`` on each machine,
then ``api.merge("results/whole", [dir0, dir1, dir2, dir3])``.

An experiment is the same typed, validated ``ExperimentSpec`` a YAML file gives; a bad field
raises one ``ConfigError`` naming it, before anything is written. ``api.open_run(DIR)`` reads a
finished (or stopped) run back.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from testbed.errors import ConfigError
from testbed.experiment.checks import Prepared, check_spec
from testbed.experiment.spec import ExperimentSpec, load_spec, parse_spec, with_output_dir

__all__ = ["experiment", "run", "merge", "open_run", "Run", "ExperimentSpec", "ConfigError", "default_out", "check", "measure"]


def experiment(source: str | Path | dict | ExperimentSpec, **fields: Any) -> ExperimentSpec:
    """An experiment from a YAML path, a mapping (an experiment file's content) or a spec,
    with top-level ``fields`` replaced (``backend="sim"``, ``repetitions=1``, ``sweep={...}``).
    Validated as a file is; raises ConfigError, writes nothing."""
    if isinstance(source, ExperimentSpec):
        data = source.to_dict()
    elif isinstance(source, dict):
        data = dict(source)
    else:
        if not fields:
            return load_spec(source)
        from testbed.yamlfile import read_yaml

        load_spec(source)  # the file's own errors name the file's fields as they are
        return parse_spec({**read_yaml(source), **fields}, base_dir=Path(source).resolve().parent)
    return parse_spec({**data, **fields})


def default_out(spec: ExperimentSpec) -> Path:
    """Where a run goes when no directory is given: the spec's output_dir, else results/<name>-<time>."""
    if spec.output_dir:
        return Path(spec.output_dir)
    return Path("results") / f"{spec.name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def check(spec: ExperimentSpec, out: Path, log: Callable[[str], None] | None = None, startup=None) -> Prepared:
    """Everything a run checks before it measures (models, methods, topology, the backend's
    availability, codebooks into ``out/codebooks``); raises ConfigError. ``startup``: a
    testbed.experiment.startup record that times the checks' steps, if any."""
    return check_spec(spec, codebook_dir=Path(out) / "codebooks", log=log, startup=startup)


def measure(spec: ExperimentSpec, out: Path, prepared: Prepared | None = None, **runner: Any):
    """Run the sweep into ``out`` (testbed.experiment.runner.Runner; ``runner``: its keyword
    arguments) and return its RunOutcome."""
    from testbed.experiment.runner import Runner

    return Runner(spec, Path(out), prepared=prepared, **runner).run()


@dataclass
class Run:
    """A run directory and what it holds."""

    dir: Path
    status: str  # complete | interrupted | failed | running (as the manifest says)

    @property
    def rows(self) -> pd.DataFrame:
        """One row per repetition (rows.parquet, else rows.csv; superseded error rows left out)."""
        from testbed.experiment.store import read_rows

        return read_rows(self.dir)

    @property
    def manifest(self) -> dict:
        from testbed.experiment.manifest import read_manifest

        return read_manifest(self.dir)

    @property
    def spec(self) -> ExperimentSpec:
        """The experiment as it ran (from the manifest)."""
        return parse_spec(self.manifest["config"])

    def summary(self) -> pd.DataFrame:
        """Medians, speed-ups and the paper-style estimate per configuration and method."""
        from testbed.experiment.report import summarize

        return summarize(self.rows)

    @property
    def plots(self) -> list[Path]:
        return sorted((self.dir / "plots").glob("*.png"))

    @property
    def report(self) -> Path:
        return self.dir / "report.html"


def run(spec: ExperimentSpec | str | Path | dict, out: str | Path | None = None, *, backend: str | None = None,
        progress: bool = False, plots: bool = True, settings: dict | None = None, shard: str | None = None) -> Run:
    """Run an experiment (a spec, or what ``experiment`` takes) on its backend (or ``backend``) into
    ``out`` (a new or empty directory; default ``default_out``). ``settings``: the backend's own
    options (e.g. the sim backend's ``{"tcp": "steady"}``). ``shard``: ``"K/N"``, only that shard of
    the sweep's units (testbed.experiment.shard; join the shards with ``merge``). Returns the Run; rows
    that failed are in it with status "error". A ConfigError is raised before anything is written."""
    from testbed.experiment.shard import shard_for

    spec = experiment(spec, **({"backend": backend} if backend else {}))
    sh = shard_for(spec, shard, "shard")
    out = Path(out) if out is not None else default_out(spec)
    if out.exists() and any(out.iterdir()):
        raise ConfigError("out", str(out), "a new or empty directory")
    spec = with_output_dir(spec, str(out.resolve()))
    prepared = check(spec, out, log=print if progress else None)
    outcome = measure(spec, out, prepared, progress=progress, plots=plots, backend_settings=settings, shard=sh)
    return Run(out, outcome.status)


def merge(out: str | Path, dirs: list[str | Path], plots: bool = True) -> Run:
    """Join the run directories of a sharded sweep into ``out`` (testbed.experiment.merge; raises
    ConfigError or MergeError, nothing written, when they are not one sweep's complete shards)."""
    from testbed.experiment.merge import merge as merge_dirs

    d = merge_dirs(out, dirs, plots=plots)
    return Run(d, "complete")


def open_run(path: str | Path) -> Run:
    """A run directory made by `testbed run` or ``run``."""
    from testbed.experiment.manifest import read_manifest

    d = Path(path)
    m = read_manifest(d) if d.is_dir() else {}
    if "config" not in m:
        raise ConfigError("run directory", str(path), "a directory with a manifest.json made by testbed run")
    return Run(d, m.get("status", "unknown"))
