"""Plots of a run's rows: pure functions from a DataFrame (store.COLUMNS) to a matplotlib Figure.

- ``latency_figure``: latency vs the swept link axis (bandwidth on a log axis), one line per
  method and params: median over repetitions, band from min to max.
- ``speedup_figure``: median latency of ``single`` at the same link profile divided by the
  method's median latency (> 1: faster than one device).
- ``breakdown_figure``: per link profile, one stacked bar per method: compute and
  communication time of the critical rank (medians), with the measured latency marked.
- ``trace_figure``: latency of each repetition against time since its bandwidth trace started.

Only rows with status "ok" are plotted; a note on each figure counts the failed ones.
``save_all`` writes every figure that applies as PNG and SVG.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

AXES = {  # swept column -> (axis label, log scale)
    "bandwidth_mbps": ("link bandwidth (Mbit/s)", True),
    "delay_ms": ("one-way link delay (ms)", False),
    "loss_pct": ("packet loss (%)", False),
    "jitter_ms": ("delay jitter (ms)", False),
}


def sweep_axis(df: pd.DataFrame) -> str | None:
    """The link column the rows vary along (bandwidth first), or None when every row has one profile."""
    for col in AXES:
        if col in df and df[col].dropna().nunique() > 1:
            return col
    return None


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    d = df[(df["status"] == "ok") & (df.get("trace", "").fillna("") == "")]
    return d


def _labels(df: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(df["label"]))  # order of first appearance = the experiment's method order


def _colors(labels: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}


def _note(fig: Figure, df: pd.DataFrame, extra: str = "") -> None:
    failed = int((df["status"] != "ok").sum())
    parts = [extra] if extra else []
    if failed:
        parts.append(f"{failed} failed row(s) not plotted (status=error; see rows.csv)")
    if parts:
        fig.text(0.01, 0.005, "; ".join(parts), fontsize=8, color="0.35", ha="left", va="bottom")


def _title(df: pd.DataFrame, what: str) -> str:
    first = df.iloc[0]
    return (f"{what} — {first['experiment']}: {first['model']}, {int(first['tokens'])} tokens, "
            f"{int(first['nodes'])} nodes, {first['topology']}, backend {first['backend']}")


def _x(df: pd.DataFrame, axis: str | None) -> pd.Series:
    return df[axis] if axis else pd.Series(0.0, index=df.index)


def _setup_x(ax, df: pd.DataFrame, axis: str | None) -> None:
    if axis is None:
        ax.set_xticks([])
        ax.set_xlabel("one link profile (see title)")
        return
    label, log = AXES[axis]
    xs = sorted(df[axis].dropna().unique())
    if log:
        ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:g}" for x in xs])
    ax.minorticks_off()
    ax.set_xlabel(label)


def latency_figure(df: pd.DataFrame) -> Figure:
    """Median latency (s) per method vs the swept axis, min-max band over repetitions."""
    ok = _ok(df)
    axis = sweep_axis(ok)
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    colors = _colors(_labels(ok))
    for lab in colors:
        g = ok[ok["label"] == lab].assign(_x=lambda d: _x(d, axis)).groupby("_x")["latency_s"]
        med, lo, hi = g.median(), g.min(), g.max()
        ax.plot(med.index, med.values, marker="o", color=colors[lab], label=lab)
        ax.fill_between(med.index, lo.values, hi.values, color=colors[lab], alpha=0.18, linewidth=0)
    _setup_x(ax, ok, axis)
    ax.set_yscale("log")
    ax.set_ylabel("inference latency (s), median; band: min-max")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(_title(df, "Latency"), fontsize=10)
    _note(fig, df)
    return fig


def speedup_table(df: pd.DataFrame) -> pd.DataFrame:
    """Rows: label x swept value; columns: latency_s (median), single_s (median of single), speedup."""
    ok = _ok(df)
    axis = sweep_axis(ok)
    med = ok.assign(_x=_x(ok, axis)).groupby(["label", "method", "_x"], sort=False)["latency_s"].median().reset_index()
    single = med[med["method"] == "single"].groupby("_x")["latency_s"].median().rename("single_s")
    out = med.join(single, on="_x")
    out["speedup"] = out["single_s"] / out["latency_s"]
    return out.rename(columns={"_x": axis or "profile"})


def speedup_figure(df: pd.DataFrame) -> Figure:
    """Speed-up over one device (single's median latency / method's) vs the swept axis."""
    ok = _ok(df)
    axis = sweep_axis(ok)
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    tab = speedup_table(df)
    xcol = axis or "profile"
    colors = _colors(_labels(ok))
    if tab["single_s"].isna().all():
        ax.text(0.5, 0.5, "no `single` rows: nothing to compare with", ha="center", va="center",
                transform=ax.transAxes)
    for lab in colors:
        t = tab[(tab["label"] == lab) & tab["speedup"].notna()]
        if len(t) and not (t["method"] == "single").all():
            ax.plot(t[xcol], t["speedup"], marker="o", color=colors[lab], label=lab)
    ax.axhline(1.0, color="0.3", linestyle="--", linewidth=1, label="single device (1x)")
    _setup_x(ax, ok, axis)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_ylabel("speed-up over single device (median latencies)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(_title(df, "Speed-up"), fontsize=10)
    _note(fig, df, "above 1x: faster than one device")
    return fig


def breakdown_figure(df: pd.DataFrame) -> Figure:
    """Stacked compute / communication seconds (critical rank, medians) per method, one panel per profile."""
    ok = _ok(df)
    axis = sweep_axis(ok)
    xs = sorted(ok[axis].dropna().unique()) if axis else [None]
    labels = _labels(ok)
    colors = _colors(labels)
    cols = min(len(xs), 3)
    rows = int(np.ceil(len(xs) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 1, 3.6 * rows + 0.8), squeeze=False,
                             layout="constrained")
    for k, x in enumerate(xs):
        ax = axes[k // cols][k % cols]
        d = ok if x is None else ok[ok[axis] == x]
        g = d.groupby("label", sort=False)[["compute_s", "comm_s", "latency_s"]].median().reindex(labels)
        pos = np.arange(len(labels))
        ax.bar(pos, g["compute_s"], color=[colors[lab] for lab in labels], label="compute")
        ax.bar(pos, g["comm_s"], bottom=g["compute_s"], color=[colors[lab] for lab in labels], alpha=0.35,
               hatch="//", edgecolor="0.3", linewidth=0.4, label="communication")
        ax.scatter(pos, g["latency_s"], marker="_", s=300, color="black", zorder=3, label="measured latency")
        ax.set_xticks(pos)
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=7)
        ax.set_ylabel("seconds (critical rank)")
        ax.set_title("one profile" if x is None else f"{AXES[axis][0].split(' (')[0]}: {x:g} {_unit(axis)}",
                     fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        if k == 0:
            ax.legend(fontsize=7, loc="upper left")
    for k in range(len(xs), rows * cols):
        axes[k // cols][k % cols].set_visible(False)
    fig.suptitle(_title(df, "Compute vs communication"), fontsize=10)
    _note(fig, df, "solid: compute, hatched: communication (incl. waiting for peers)")
    return fig


def trace_figure(df: pd.DataFrame) -> Figure:
    """Latency of each repetition against seconds since its cell's bandwidth trace started."""
    d = df[(df["status"] == "ok") & (df["trace"].fillna("") != "")]
    traces = list(dict.fromkeys(d["trace"]))
    fig, axes = plt.subplots(len(traces), 1, figsize=(8, 3.8 * len(traces) + 0.6), squeeze=False,
                             layout="constrained")
    colors = _colors(_labels(d))
    for ax, name in zip(axes[:, 0], traces):
        t = d[d["trace"] == name]
        for lab in colors:
            r = t[t["label"] == lab]
            ax.plot(r["trace_time_s"], r["latency_s"], marker="o", linestyle="-", color=colors[lab], label=lab)
        ax.set_xlabel(f"time since trace '{name}' started (s)")
        ax.set_ylabel("inference latency (s)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(_title(df, "Latency under a bandwidth trace"), fontsize=10)
    return fig


def _unit(axis: str) -> str:
    return {"bandwidth_mbps": "Mbit/s", "delay_ms": "ms", "loss_pct": "%", "jitter_ms": "ms"}[axis]


def figures(df: pd.DataFrame) -> dict[str, Figure]:
    """Every figure that applies to these rows, by file stem."""
    out: dict[str, Figure] = {}
    if len(_ok(df)):
        out["latency"] = latency_figure(df)
        out["speedup"] = speedup_figure(df)
        out["breakdown"] = breakdown_figure(df)
    if "trace" in df and ((df["trace"].fillna("") != "") & (df["status"] == "ok")).any():
        out["trace"] = trace_figure(df)
    return out


def save_all(df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write every applicable figure as PNG and SVG; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, fig in figures(df).items():
        for ext in ("png", "svg"):
            p = out / f"{stem}.{ext}"
            fig.savefig(p, dpi=130 if ext == "png" else None)
            paths.append(p)
        plt.close(fig)
    return paths
