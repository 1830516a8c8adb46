"""Simulation against a `testbed run` results directory: testbed.sim.validate on its rows and traces.

Everything the prediction needs comes from the run's manifest, none of it from its measurements:
the topology is the run's own (the experiment as resolved in ``config.topology``, so a topology
given inline in the experiment, or as a path, is simulated as it was emulated), each rank's
device speed comes from the devices of that topology and the experiment (``node_devices``), and
how the devices computed (time dilation, throttling, contention) from its dilation record
(testbed.sim.emulation.EmulationModel).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from testbed.errors import ConfigError, check
from testbed.experiment.manifest import read_manifest
from testbed.experiment.spec import parse_spec
from testbed.experiment.store import read_rows, read_traces
from testbed.sim.emulation import EmulationModel, measured_throttle
from testbed.sim.network import KINDS
from testbed.sim.simulator import Simulator, speed_from_device
from testbed.sim.validate import compare, save_validation


def emulation_cpus(run_dir: str | Path) -> int | None:
    """Cores of the machine a run was emulated on (its manifest), for ``SimConfig.shared_cpus``."""
    cpus = read_manifest(run_dir).get("machine", {}).get("cpu_count")
    return int(cpus) if isinstance(cpus, int) and cpus >= 1 else None


def run_spec(run_dir: str | Path):
    """The experiment a run resolved (its manifest's ``config``), parsed again."""
    config = read_manifest(run_dir).get("config")
    check(isinstance(config, dict), "run_dir", str(run_dir),
          "a results directory with the manifest.json testbed run writes (it holds the experiment)")
    try:
        return parse_spec(config)
    except ConfigError as e:
        raise ConfigError(f"manifest.json config ({e.field})", e.value, e.allowed) from None


def run_speeds(run_dir: str | Path) -> list[float]:
    """Compute slow-down per rank of a run: its nodes' device speeds (experiment and topology)."""
    from testbed.experiment.topology import node_devices

    spec = run_spec(run_dir)
    try:
        return [speed_from_device(d.speed) for d in node_devices(spec)]
    except ConfigError as e:
        raise ConfigError(f"manifest.json config ({e.field})", e.value, e.allowed) from None


def run_topology(run_dir: str | Path) -> Any:
    """The topology a run used, from its manifest: a topology kind the simulator scales to any N
    (star | mesh | line | shared_medium, named so in the experiment), else the loaded topology with
    the experiment's devices (testbed.experiment.topology.experiment_topology)."""
    from testbed.experiment.topology import experiment_topology

    spec = run_spec(run_dir)
    try:
        if isinstance(spec.topology, str) and spec.topology in KINDS:
            return spec.topology
        return experiment_topology(spec)
    except ConfigError as e:
        raise ConfigError(f"manifest.json config ({e.field})", e.value, e.allowed) from None


def run_emulation(run_dir: str | Path, device_probe: bool = True, rows: pd.DataFrame | None = None
                  ) -> EmulationModel:
    """How a run's devices computed (dilation, throttling overhead, contention), from its manifest;
    ``device_probe``: the throttling overhead as the run's devices measured it where they did
    (``measured_throttle``), instead of the constant for its slice; ``rows``: the run's rows, if
    already read."""
    if device_probe and rows is None:
        rows = read_rows(run_dir)
    return EmulationModel.of_manifest(read_manifest(run_dir), throttle=measured_throttle(rows) if device_probe else None)


def validate_run(run_dir: str | Path, sim: Simulator, out_dir: str | Path | None = None,
                 topology: Any = None, emulation: EmulationModel | None = None, host_speed: bool = True,
                 rows: pd.DataFrame | None = None) -> tuple[pd.DataFrame, list[Path]]:
    """``compare`` on a results directory (rows and traces), saved beside it (validation/);
    ``topology``: instead of the run's own (``run_topology``); ``emulation``: instead of the
    run's own (``run_emulation``), which replaces ``sim``'s ``shared_cpus``, ``compute_scale``,
    ``segment_jitter_k`` and ``dispatch_s``; ``host_speed``: carry the calibration over to the
    host's speed when the run measured (host probes, ``compare``); ``rows``: the run's rows, if
    already read."""
    d = Path(run_dir)
    rows = read_rows(d) if rows is None else rows
    check(len(rows) > 0, "run_dir", str(d), "a results directory with rows made by testbed run")
    if not (rows["status"] == "ok").any():
        first = str(rows["error"].iloc[0])[:200]
        raise ConfigError("run_dir", str(d), f"a run with ok rows to predict (all {len(rows)} of this one's "
                                             f"failed; the first: {first})")
    topo = topology if topology is not None else run_topology(d)
    emu = emulation if emulation is not None else run_emulation(d, rows=rows)
    run_sim = Simulator(replace(sim.config, shared_cpus=emu.shared_cpus, compute_scale=emu.compute_scale,
                                segment_jitter_k=emu.segment_jitter_k, dispatch_s=emu.dispatch_s), log=sim.log)
    table = compare(rows, run_sim, traces=read_traces(d), topology=topo, speed=run_speeds(d), host_speed=host_speed)
    return table, save_validation(table, out_dir if out_dir is not None else d / "validation")


def error_table(table: pd.DataFrame) -> pd.DataFrame:
    """Median and p90 |error| (percent) per method label and overall, the median signed error (the
    bias: negative where the simulator predicts too fast), cells predicted / compared, and the median
    over cells of the compute's thread CPU over its calibrated CPU (``compute_cpu_ratio``; NaN for
    runs whose traces carry no ``cpu_s``)."""
    from testbed.sim.validate import summary

    rows = []
    for label, grp in list(table.groupby("label", sort=False)) + [("overall", table)]:
        s = summary(grp)
        rows.append({"method": label, "cells": s["cells"], "predicted": s["predicted"],
                     "median_error_pct": s["median_error_pct"], "median_abs_error_pct": s["median_abs_error_pct"],
                     "p90_abs_error_pct": s["p90_abs_error_pct"],
                     "replay_median_abs_error_pct": s["replay_median_abs_error_pct"],
                     "compute_cpu_ratio": s["compute_cpu_ratio"]})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    """`testbed validate RUN_DIR`: predict every cell of an emulated run from calibration alone."""
    import argparse
    import sys

    from testbed.sim.simulator import SimConfig
    from testbed.sim.validate import reference_spread

    p = argparse.ArgumentParser(
        prog="testbed validate",
        description="Predict every cell of an emulated run on the simulator from calibration alone (topology, "
                    "devices and time dilation read from the run's manifest), print median and p90 |error| per "
                    "method and overall, and write validation.csv and validation.png (predicted vs measured).")
    p.add_argument("run_dir", help="results directory of `testbed run` (rows.csv, manifest.json, traces.jsonl)")
    p.add_argument("--calibration", metavar="DIR", default="results/calibration",
                   help="compute profiles directory (default results/calibration; missing profiles are measured)")
    p.add_argument("--out", metavar="DIR", help="where validation.csv and .png go (default RUN_DIR/validation)")
    p.add_argument("--no-measure", action="store_true", help="never measure: stored profiles or extrapolation only")
    p.add_argument("--quiet", action="store_true", help="no per-cell table")
    p.add_argument("--no-device-probe", action="store_true",
                   help="charge a dilated run's throttling by the constant for its slice, not by what its devices "
                        "measured (the rows' device and host probes)")
    p.add_argument("--no-host-speed", action="store_true",
                   help="predict from the calibration as measured, not scaled to the host's speed when the run "
                        "measured (the rows' and the profiles' host probes)")
    args = p.parse_args(argv)
    try:
        sim = Simulator(SimConfig(calibration_dir=args.calibration, measure_missing=not args.no_measure),
                        log=lambda m: print(f"  {m}", flush=True))
        rows = read_rows(args.run_dir)
        emu = run_emulation(args.run_dir, device_probe=not args.no_device_probe, rows=rows)
        print(f"{args.run_dir}: {emu.why}")
        table, paths = validate_run(args.run_dir, sim, out_dir=args.out, emulation=emu,
                                    host_speed=not args.no_host_speed, rows=rows)
    except ConfigError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{p.prog}: stopped by SIGINT; calibration measured so far is kept in {args.calibration}",
              file=sys.stderr)
        return 130
    fmt = {"formatters": {"compute_cpu_ratio": lambda v: f"{v:.3f}"}, "float_format": lambda v: f"{v:.1f}"}
    scale = table["host_scale"].dropna() if "host_scale" in table else []
    if args.no_host_speed:
        print("host speed: not carried over (--no-host-speed): compute as calibrated")
    elif len(scale):
        print(f"host speed: compute x {scale.iloc[0]:.3f}, the run's host probe over the calibration's (medians)")
    else:
        print("host speed: not carried over (the run's rows or its profiles have no host probe)")
    if not args.quiet and len(table):
        cols = ["label", "bandwidth_mbps", "delay_ms", "loss_pct", "measured_latency_s", "predicted_latency_s",
                "replayed_latency_s", "error_pct"]
        print(table[[c for c in cols if c in table]].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(error_table(table).to_string(index=False, **fmt))
    floor = reference_spread(table)
    reps, single = floor["repetition_spread_pct"], floor["single_spread_pct"]
    said = ([f"repetitions of a cell differ from their median by {reps:.1f}% (median)"] if reps == reps else []) + (
        [f"single, the same work in every cell, spreads {single:.1f}% around its median"] if single == single else [])
    if said:
        print("the reference itself: " + "; ".join(said) + " (errors below these are not resolvable)")
    failed = table[table["sim_status"] != "ok"] if len(table) else table
    for error, n in (failed["sim_error"].value_counts().items() if len(failed) else []):
        print(f"{n} cell(s) not predicted: {error}")
    print("written: " + ", ".join(str(x) for x in paths))
    return 0
