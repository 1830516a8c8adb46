"""Simulation against emulation: the same cells predicted and measured, as a table and a plot.

``compare(emulated, sim)`` takes emulated result rows (a DataFrame with the runner's
columns, as a run directory's rows.csv holds them) and predicts every
(method, params, link profile) cell that has ``ok`` rows, two ways:

- ``predicted_latency_s``: the whole simulator: compute from this host's calibration
  (``Simulator.profile``), network and TCP model, device speed factors;
- ``replayed_latency_s`` (when the run's per-rank traces are given): the emulated
  run's own compute segments replayed over the modelled network (plus the simulator's
  ``dispatch_s``), which isolates the network model from compute calibration (compute
  under emulation includes the contention of N nodes on this machine's cores).

Errors are relative to the measured median latency over repetitions:
``error_pct = 100 * (predicted - measured) / measured``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from testbed.errors import ConfigError, check  # noqa: E402
from testbed.net.profile import LinkProfile  # noqa: E402
from testbed.sim.engine import simulate  # noqa: E402
from testbed.sim.simulator import Simulator  # noqa: E402

CELL = ["experiment", "model", "method", "method_params", "label", "tokens", "batch", "nodes", "topology",
        "bandwidth_mbps", "delay_ms", "jitter_ms", "loss_pct"]
REQUIRED = CELL + ["repetition", "latency_s", "comm_s", "bytes_on_wire", "status"]
PROFILE_COLS = ["bandwidth_mbps", "delay_ms", "jitter_ms", "loss_pct"]
#: where the model draws (compute jitter, sampled loss or link jitter) a prediction is the median of this
#: many draws at least: the model's median, not that of as few draws as the cell has repetitions
SAMPLES = 9


def _profile(row: Any) -> LinkProfile:
    bw = row["bandwidth_mbps"]
    return LinkProfile(None if bw is None or (isinstance(bw, float) and math.isnan(bw)) else float(bw),
                       float(row["delay_ms"]), float(row["jitter_ms"]), float(row["loss_pct"]))


def _trace_index(traces: list[dict] | None) -> dict[tuple, list[list[dict]]]:
    """Per-rank traces of a run (store.read_traces) by (method, params, profile)."""
    out: dict[tuple, list[list[dict]]] = {}
    for t in traces or []:
        key = (t["method"], t["method_params"], *(_num(t.get(c)) for c in PROFILE_COLS))
        out.setdefault(key, []).append(t["ranks"])
    return out


def _num(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def compare(emulated: pd.DataFrame, sim: Simulator, traces: list[dict] | None = None,
            topology: Any = None, speed: float | list[float] = 1.0, host_speed: bool = True) -> pd.DataFrame:
    """One row per emulated cell: measured and predicted medians and their relative errors.

    ``topology`` overrides the rows' topology name (e.g. a loaded net.topology.Topology);
    ``traces`` are the run's per-rank traces (as a run directory's traces.jsonl holds them).
    ``host_speed``: scale compute by how much slower the host was when the run measured than when
    its profiles were (``host_scale``; the ``host_scale`` column, NaN where it could not be told).
    """
    missing = [c for c in REQUIRED if c not in emulated.columns]
    check(not missing, "emulated rows", missing, "the runner's columns (" + ", ".join(REQUIRED) + ")")
    ok = emulated[(emulated["status"] == "ok") & (emulated.get("trace", "").fillna("") == "")]
    by_trace = _trace_index(traces)
    groups = [(dict(zip(CELL, key)), grp) for key, grp in ok.groupby(CELL, dropna=False, sort=False)]
    runs_as = [dict(model=c["model"], method=c["method"], params=run_params(c, grp), tokens=int(c["tokens"]),
                    nodes=int(c["nodes"]), batch=int(c["batch"]), topology=topology if topology is not None
                    else c["topology"]) for c, grp in groups]  # per cell, what the simulator runs
    _measure_together(sim, runs_as)
    scale = host_scale(ok, sim, runs_as) if host_speed else None
    out = []
    for (cell, grp), what in zip(groups, runs_as):
        prof = _profile(cell)
        reps = len(grp)
        try:
            pred = sim.results(**what, profile=prof, speed=speed, host_scale=scale or 1.0,
                               repetitions=reps if not _random(sim, prof) else max(reps, SAMPLES))
            status, error = "ok", ""
        except ConfigError as e:  # a cell the simulator cannot run: recorded, the others are compared
            pred, status, error = [], "error", str(e)
        med = grp["latency_s"].median()
        rec = {**cell, "repetitions": reps,
               "measured_latency_s": med, "measured_comm_s": grp["comm_s"].median(),
               "measured_spread_pct": 100 * (grp["latency_s"] - med).abs().median() / med if reps > 1 else math.nan,
               "measured_bytes_on_wire": grp["bytes_on_wire"].median(),
               "predicted_latency_s": math.nan, "predicted_comm_s": math.nan, "predicted_bytes_on_wire": math.nan,
               "replayed_latency_s": math.nan, "compute_cpu_ratio": math.nan, "host_scale": scale or math.nan,
               "sim_status": status, "sim_error": error}
        if pred:  # the critical rank's comm_s, as a row's comm_s (testbed.experiment.metrics.timing_columns)
            rec.update(predicted_latency_s=float(np.median([r.latency_s for r in pred])),
                       predicted_comm_s=float(np.median([r.critical.comm_s for r in pred])),
                       predicted_bytes_on_wire=float(np.median([r.bytes_on_wire for r in pred])))
        runs = by_trace.get((cell["method"], cell["method_params"], *(_num(cell[c]) for c in PROFILE_COLS)))
        if runs:
            net = sim.network(topology if topology is not None else cell["topology"], int(cell["nodes"]), prof)
            rec["replayed_latency_s"] = sim.config.dispatch_s + float(np.median([
                simulate(ranks, net, sim.wire, sim.config.tcp, speed=1.0, seed=i).latency_s
                for i, ranks in enumerate(runs)]))
            if status == "ok":
                rec["compute_cpu_ratio"] = compute_cpu_ratio(runs, sim.profile(sim.key(**what, profile=prof)).traces)
        out.append(rec)
    table = pd.DataFrame(out)
    if len(table):
        m = table["measured_latency_s"]
        table["error_pct"] = 100 * (table["predicted_latency_s"] - m) / m
        table["abs_error_pct"] = table["error_pct"].abs()
        table["replay_error_pct"] = 100 * (table["replayed_latency_s"] - m) / m
    return table


def _measure_together(sim: Simulator, cells: list[dict]) -> None:
    """Measure every profile the cells need and the store lacks in one calibration, their
    repetitions interleaved (Simulator.measure_many), rather than one by one as cells ask."""
    keys = []
    for c in cells:
        try:
            keys.append(sim.key(**c))
        except ConfigError:  # a cell the simulator cannot run is reported by compare
            continue
    todo = [k for k in dict.fromkeys(keys) if sim.wants_measuring(k)]
    if len(todo) > 1:
        sim.measure_many(todo)


def host_scale(rows: pd.DataFrame, sim: Simulator, cells: list[dict]) -> float | None:
    """How much slower this host was when a run measured than when the profiles its cells use were
    measured: the median of the rows' host probes (one per unit, testbed.models.probe) over the
    median of the profiles' (one per profile, taken around its measurement). Medians over the whole
    run and calibration: a single probe is a fraction of a second and the host's speed moves ±10%
    from one second to the next, so per-cell ratios add that noise; what they share is the drift
    between one time and another. None where the rows or the profiles have no probe."""
    if "host_probe_s" not in rows:
        return None
    run = pd.to_numeric(rows["host_probe_s"], errors="coerce").dropna()
    probes = {}  # per profile used, however many cells use it
    for c in cells:
        try:
            key = sim.key(**c)
            probes[key] = sim.profile(key).meta.get("host_probe_s")
        except ConfigError:  # a cell the simulator cannot run is reported by compare
            continue
    cal = [v for v in probes.values() if v]
    if not len(run) or not cal:
        return None
    return float(run.median()) / float(np.median(cal))


def _random(sim: Simulator, prof: LinkProfile) -> bool:
    """Whether a cell's predictions differ from draw to draw."""
    sampled = sim.config.tcp.loss_mode == "sampled" and (prof.loss_pct > 0 or prof.jitter_ms > 0)
    return sim.config.segment_jitter_k > 0 or sampled


def run_params(cell: dict, rows: pd.DataFrame) -> dict:
    """The params a cell ran with: its ``method_params``, plus the all-reduce algorithm tensor parallel
    used, which the rows' ``all_reduce`` column records. Rows without that column were measured before
    the algorithm was chosen per topology, when every all-reduce was the ring."""
    params = _params(cell["method_params"])
    if cell["method"] == "tensor_parallel" and "all_reduce" not in params:
        ran = rows["all_reduce"].dropna().astype(str) if "all_reduce" in rows else pd.Series(dtype=str)
        ran = ran[ran != ""]
        params["all_reduce"] = ran.iloc[0] if len(ran) else "ring"
    return params


def _params(text: Any) -> dict:
    import json

    return json.loads(text) if isinstance(text, str) and text else {}


def compute_cpu_ratio(runs: list[list[dict]], calibrated: list) -> float:
    """The thread CPU the run's compute segments took (``Compute.cpu_s``, host CPU seconds) over the
    same segments' calibrated CPU time, summed over every rank, repetition and segment of at least
    ``JITTER_MIN_SEGMENT_S``: above 1, the same work cost the nodes more CPU than calibration measured
    (throttling overhead and whatever the kernel charged the thread, packet processing included; not
    the time a segment was held, throttled or waiting). ``runs``: one cell's per-rank traces per
    repetition (dicts, as traces.jsonl holds them); ``calibrated``: the profile's per-rank Traces. NaN
    where the traces carry no ``cpu_s`` (runs made before they did) or the schedules differ."""
    from testbed.comm.trace import Compute
    from testbed.sim.emulation import JITTER_MIN_SEGMENT_S

    cal = [[e.duration_s for e in t.events if isinstance(e, Compute)] for t in calibrated]
    used = spent = 0.0
    for ranks in runs:
        if len(ranks) != len(cal):
            return math.nan
        for r, rank in enumerate(ranks):
            segs = [e for e in rank["events"] if e.get("type") == "compute"]
            if len(segs) != len(cal[r]):
                return math.nan
            for seg, c in zip(segs, cal[r]):
                if c >= JITTER_MIN_SEGMENT_S:
                    if seg.get("cpu_s") is None:
                        return math.nan
                    used, spent = used + c, spent + seg["cpu_s"]
    return spent / used if used > 0 else math.nan


def summary(table: pd.DataFrame) -> dict[str, float]:
    """Median and 90th-percentile absolute errors (percent) over the compared cells, the median
    signed error (``median_error_pct``: below 0, the cells are mostly predicted too fast; a model
    term missing shows as a bias, noise does not), and how far the reference agrees with itself
    (``reference_spread``)."""
    err = table["abs_error_pct"].dropna() if len(table) else pd.Series(dtype=float)
    signed = table["error_pct"].dropna() if len(table) else pd.Series(dtype=float)
    cpu = table["compute_cpu_ratio"].dropna() if "compute_cpu_ratio" in table else pd.Series(dtype=float)
    rep = table["replay_error_pct"].abs().dropna() if len(table) else pd.Series(dtype=float)
    return {"cells": int(len(table)), "predicted": int(len(err)),
            "median_error_pct": float(signed.median()) if len(signed) else math.nan,
            "median_abs_error_pct": float(err.median()) if len(err) else math.nan,
            "p90_abs_error_pct": float(err.quantile(0.9)) if len(err) else math.nan,
            "replay_median_abs_error_pct": float(rep.median()) if len(rep) else math.nan,
            "compute_cpu_ratio": float(cpu.median()) if len(cpu) else math.nan,
            **reference_spread(table)}


def reference_spread(table: pd.DataFrame) -> dict[str, float]:
    """How reproducible the measured reference is, in percent, as a floor under any prediction's error:

    - ``repetition_spread_pct``: median over cells of the median |repetition - cell median| / cell median;
    - ``single_spread_pct``: ``single`` does the same work in every cell of a run (it sends nothing), so
      the median |cell - median over cells| / that median of its cells (per token count and batch) is
      what an exact compute model would still be off by (nan with fewer than two such cells).
    """
    spread = table["measured_spread_pct"].dropna() if "measured_spread_pct" in table else pd.Series(dtype=float)
    devs: list[float] = []
    if len(table) and "method" in table:
        for _, grp in table[table["method"] == "single"].groupby(["model", "tokens", "batch"]):
            if len(grp) > 1:
                m = grp["measured_latency_s"].median()
                devs += (100 * (grp["measured_latency_s"] - m).abs() / m).tolist()
    return {"repetition_spread_pct": float(spread.median()) if len(spread) else math.nan,
            "single_spread_pct": float(np.median(devs)) if devs else math.nan}


def comparison_figure(table: pd.DataFrame) -> Figure:
    """Predicted vs measured median latency per cell (log-log), y = x and a +-10% band."""
    fig, ax = plt.subplots(figsize=(6.5, 6), layout="constrained")
    t = table.dropna(subset=["predicted_latency_s"])
    labels = list(dict.fromkeys(t["label"])) if len(t) else []
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    for i, lab in enumerate(labels):
        d = t[t["label"] == lab]
        ax.scatter(d["measured_latency_s"], d["predicted_latency_s"], color=cmap(i % cmap.N), label=lab, zorder=3)
        if d["replayed_latency_s"].notna().any():
            ax.scatter(d["measured_latency_s"], d["replayed_latency_s"], facecolors="none",
                       edgecolors=cmap(i % cmap.N), zorder=3)
    if len(t):
        lo = min(t["measured_latency_s"].min(), t["predicted_latency_s"].min()) / 1.5
        hi = max(t["measured_latency_s"].max(), t["predicted_latency_s"].max()) * 1.5
        xs = np.geomspace(lo, hi, 50)
        ax.plot(xs, xs, color="0.3", lw=1, label="predicted = measured")
        ax.fill_between(xs, xs * 0.9, xs * 1.1, color="0.85", label="±10%", zorder=1)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured latency, emulation (s, median over repetitions)")
    ax.set_ylabel("predicted latency, simulation (s)")
    s = summary(table)
    ax.set_title(f"Simulation vs emulation: {s['predicted']} cells, median |error| "
                 f"{s['median_abs_error_pct']:.1f}%\n(filled: calibrated compute; hollow: emulated traces replayed)",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if len(t):
        ax.legend(fontsize=8, loc="upper left")
    else:
        ax.text(0.5, 0.5, "no cell could be predicted (see sim_error in validation.csv)", ha="center", va="center",
                transform=ax.transAxes)
    return fig


def save_validation(table: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write validation.csv and validation.png (predicted vs measured) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv, png = out / "validation.csv", out / "validation.png"
    table.to_csv(csv, index=False)
    fig = comparison_figure(table)
    fig.savefig(png, dpi=150)
    plt.close(fig)
    return [csv, png]
