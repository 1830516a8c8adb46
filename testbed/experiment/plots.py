"""Plots of a run's rows: pure functions from a DataFrame (store.COLUMNS) to a matplotlib Figure.

Rows of different configurations are never drawn as one point: the first swept link axis is the
x axis and every other dimension that varies (``report.DIMENSIONS``: delay, jitter, loss, trace,
nodes, tokens, model, ...) gets one panel per combination of its values, titled with them.

- ``latency_figure``: latency vs the swept link axis (bandwidth on a log axis), one line per
  method and params: median over repetitions, band from min to max.
- ``speedup_figure``: median latency of ``single`` in the same configuration divided by the
  method's median latency (> 1: faster than one device).
- ``breakdown_figure``: per link profile, one stacked bar per method: compute and
  communication time of the critical rank (medians), with the measured latency marked.
- ``trace_figure``: latency of each repetition against time since its bandwidth trace started,
  one panel per trace.
- ``fault_figure`` (runs with scheduled faults): latency of each repetition against device time
  since its unit's repetitions started, the repetitions hit by a fault ringed, failed ones marked,
  the events' spans shaded; one panel per configuration.
- ``speedup_heatmap_figure`` (``speedup_heatmap_single``, ``speedup_heatmap_baseline``; runs where
  bandwidth and delay vary, else bandwidth and another link column): speed-up over ``single`` and
  over the best multi-device baseline (TP, SP, SP-int8, BP) in every cell, the value written in it, a panel
  per method, one diverging colour scale centred on 1x; ``speedup_grid`` returns the numbers.
- ``latency_cdf_figure`` (runs with loss > 0 or units a scheduled fault hit): the distribution of
  each method's latency over repetitions, a panel per lossy configuration and per fault-hit one.

Only rows with status "ok" are plotted (the fault figure marks the failed ones too, the CDF counts
them as never finishing); a note on each figure counts the failed ones. Repetitions hit by a
scheduled fault appear only in the fault figure and the CDF (and the trace figure, ringed), never
in the medians of the others.
``save_all`` writes every figure that applies as PNG, SVG and PDF. A method has the same colour in
every plot (``METHOD_COLORS``, colour-blind-safe).
"""

from __future__ import annotations

import textwrap

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from testbed.experiment.report import BASELINES, DIMENSIONS, describe, varying  # noqa: E402

AXES = {  # swept column -> (axis label, log scale)
    "bandwidth_mbps": ("link bandwidth (Mbit/s)", True),
    "delay_ms": ("one-way link delay (ms)", False),
    "loss_pct": ("packet loss (%)", False),
    "jitter_ms": ("delay jitter (ms)", False),
}
MAX_PANELS = 12  # of the breakdown figure: more bar panels than that are unreadable


def sweep_axis(df: pd.DataFrame) -> str | None:
    """The link column the rows vary along (bandwidth first), or None when every row has one profile."""
    for col in AXES:
        if col in df and df[col].dropna().nunique() > 1:
            return col
    return None


def facet_axes(df: pd.DataFrame, axis: str | None) -> list[str]:
    """The other dimensions that vary: one panel per combination of their values."""
    return [c for c in varying(df) if c != axis]


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    """Measured rows of fixed link profiles that no scheduled fault hit (trace cells and fault hits
    have their own figures)."""
    return df[(df["status"] == "ok") & (_trace(df) == "") & (_text(df, "faults") == "")]


def _trace(df: pd.DataFrame) -> pd.Series:
    """The trace name of every row, "" for fixed profiles (also when the column is missing or all-NaN)."""
    return _text(df, "trace")


def _text(df: pd.DataFrame, col: str) -> pd.Series:
    """A text column, "" where empty or missing."""
    if col not in df:
        return pd.Series("", index=df.index)
    return df[col].map(lambda v: v if isinstance(v, str) else "")


def _fault_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of units that replayed scheduled faults (they have a time since their unit's start)."""
    return df[df["fault_time_s"].notna()] if "fault_time_s" in df else df.iloc[:0]


def _labels(df: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(df["label"]))  # order of first appearance = the experiment's method order


#: one colour per method in every plot of every run (Okabe and Ito's palette: told apart with every
#: common colour-vision deficiency); methods outside it take the palette's remaining colours
METHOD_COLORS = {"single": "#000000", "tensor_parallel": "#E69F00", "sequence_parallel": "#56B4E9",
                 "sequence_parallel_int8": "#009E73", "block_parallel": "#CC79A7", "astra": "#D55E00"}
OTHER_COLORS = ("#0072B2", "#F0E442", "#999999")
#: further labels of one method (other params: astra G=1 and G=32) mix its colour with white (> 0) or black (< 0)
SHADES = (0.0, 0.45, -0.4, 0.7, -0.65)


def _colors(rows: pd.DataFrame) -> dict[str, tuple]:
    """label -> colour: its method's colour, a lighter or darker shade of it for each further label."""
    out: dict[str, tuple] = {}
    methods = list(dict.fromkeys(rows["method"]))
    others = iter(OTHER_COLORS * len(methods))
    for m in methods:
        base = np.array(matplotlib.colors.to_rgb(METHOD_COLORS.get(m) or next(others)))
        for k, lab in enumerate(sorted(rows.loc[rows["method"] == m, "label"].unique())):
            f = SHADES[k % len(SHADES)]
            out[lab] = tuple(base + (1 - base) * f if f >= 0 else base * (1 + f))
    return out


def _facets(ok: pd.DataFrame, cols: list[str]) -> list[tuple[str, pd.DataFrame]]:
    """(panel title, rows) for every combination of the values of ``cols``."""
    if not cols:
        return [("", ok)]
    out = []
    for key, d in ok.groupby(cols, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        traced = (_trace(d) != "").all()  # its bandwidth is the trace's, not a value of the sweep
        out.append((", ".join(describe(c, v) for c, v in zip(cols, key)
                              if not (c == "bandwidth_mbps" and pd.isna(v) and traced)), d))
    return out


def _panels(n: int, w: float, h: float, sharey: bool = False):
    cols = min(n, 3)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols + 2.2, h * rows + 1.2), squeeze=False, sharey=sharey,
                             layout="constrained")
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _note_text(df: pd.DataFrame, extra: str = "") -> str:
    failed = int((df["status"] != "ok").sum())
    hit = int(((df["status"] == "ok") & (_trace(df) == "") & (_text(df, "faults") != "")).sum())
    parts = [extra] if extra else []
    if failed:
        parts.append(f"{failed} failed row(s) not plotted (status=error; see rows.csv)")
    if hit:
        parts.append(f"{hit} row(s) hit by scheduled faults not plotted here (see the faults figure)")
    return "; ".join(parts)


def _note(fig: Figure, df: pd.DataFrame, extra: str = "") -> None:
    text = _note_text(df, extra)
    if text:  # supxlabel: constrained layout keeps room for it below the tick labels
        fig.supxlabel(text, fontsize=8, color="0.35")


def _title(df: pd.DataFrame, what: str, rows: pd.DataFrame | None = None) -> str:
    """What the figure shows and what all its rows share (what varies is in the panels' titles);
    ``rows``: those drawn (default: the fixed profiles'), whose shared link values are named."""
    first = df.iloc[0]
    mech = first["mechanism"]
    f = first.get("time_dilation")
    vary = set(varying(df))
    shared = [text for col, text in (("model", str(first["model"])), ("tokens", f"{first['tokens']:g} tokens"),
                                     ("nodes", f"{first['nodes']:g} nodes"),
                                     ("topology", f"topology {first['topology']}")) if col not in vary]
    drawn = _ok(df) if rows is None else rows
    link = [describe(c, drawn[c].iloc[0]) for c in AXES if len(drawn) and c in drawn
            and drawn[c].nunique(dropna=False) == 1 and not (c != "bandwidth_mbps" and drawn[c].iloc[0] == 0)]
    what_line = f"{what}" + (f" at {', '.join(link)}" if link else "")
    run_line = (f"{first['experiment']}: " + ", ".join([*shared, f"backend {first['backend']}"])
                + ("" if pd.isna(mech) or mech in ("none", "?", "") else f" ({mech})")
                + ("" if f is None or pd.isna(f) or f == 1 else f", time dilation {f:g}x"))
    return what_line + "\n" + "\n".join(textwrap.wrap(run_line, 100))  # long runs' lines wrap, not clip


def _setup_x(ax, df: pd.DataFrame, axis: str) -> None:
    label, log = AXES[axis]
    xs = sorted(df[axis].dropna().unique())
    if log:
        ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:g}" for x in xs])
    ax.minorticks_off()
    ax.set_xlabel(label)


def _log_y(ax, suffix: str = "") -> None:
    """Log y axis with plain numbers (0.02, not 2x10^-2), ticks at 1-2-5 steps when the range allows."""
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    if lo > 0 and hi / lo <= 1e3:
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}{suffix}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _log_ticks(axis, lo: float, hi: float, suffix: str = "") -> None:
    """Plain-number ticks on a log ``axis`` spanning lo..hi: 1-2-5 steps, or four evenly spaced
    (on the log scale, two significant digits) when the span is under a decade."""
    if hi / lo < 10:
        ticks = sorted({float(f"{v:.2g}") for v in np.geomspace(lo * 1.05, hi / 1.05, 4)})
        axis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    else:
        axis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}{suffix}"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _log_panel(ax, title: str, suffix: str = "") -> None:
    """A panel of a faceted figure: log y axis, major grid, the facet's title."""
    _log_y(ax, suffix)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title(title, fontsize=9)


def _finish_panels(fig: Figure, axes, df: pd.DataFrame, ylabel: str, note: str, title: str) -> Figure:
    """Y label on the first panel, one legend below all, the run's title above."""
    axes[0].set_ylabel(ylabel)
    _legend(fig, axes, _note_text(df, note))
    fig.suptitle(_title(df, title), fontsize=10)
    return fig


def _legend(fig: Figure, axes, note: str = "") -> None:
    """One legend for all panels, below them (never over the title), with the figure's note as its title."""
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    leg = fig.legend([handles[lab] for lab in labels], labels, loc="outside lower center", fontsize=8,
                     ncols=min(4, len(labels)), frameon=False, title=note or None, title_fontsize=8)
    if note:
        leg.get_title().set_color("0.35")


def latency_figure(df: pd.DataFrame) -> Figure:
    """Median latency (s) per method vs the swept axis, min-max band over repetitions; a panel per
    combination of the other swept link axes."""
    ok = _ok(df)
    axis = sweep_axis(ok)
    if axis is None:
        return _latency_bars(df)
    facets = _facets(ok, facet_axes(ok, axis))
    fig, axes = _panels(len(facets), 5.2, 3.8, sharey=True)
    colors = _colors(ok)
    for ax, (title, d) in zip(axes, facets):
        for lab in colors:
            g = d[d["label"] == lab].groupby(axis)["latency_s"]
            med, lo, hi = g.median(), g.min(), g.max()
            ax.plot(med.index, med.values, marker="o", color=colors[lab], label=lab)
            ax.fill_between(med.index, lo.values, hi.values, color=colors[lab], alpha=0.18, linewidth=0)
        _setup_x(ax, ok, axis)
        _log_panel(ax, title)
    return _finish_panels(fig, axes, df, "inference latency (s)", "line: median over repetitions, band: min to max",
                          "Latency")


def _latency_bars(df: pd.DataFrame) -> Figure:
    """One link profile: a bar per method (median latency), whiskers from min to max; a panel per
    combination of the other dimensions that vary."""
    ok = _ok(df)
    labels = _labels(ok)
    colors = _colors(ok)
    facets = _facets(ok, facet_axes(ok, None))
    fig, axes = _panels(len(facets), 6.5, 1.0 + 0.45 * len(labels), sharey=True)
    pos = np.arange(len(labels))
    for ax, (title, d) in zip(axes, facets):
        g = d.groupby("label", sort=False)["latency_s"].agg(["median", "min", "max"]).reindex(labels)
        ax.barh(pos, g["median"], color=[colors[lab] for lab in labels],
                xerr=[g["median"] - g["min"], g["max"] - g["median"]], capsize=3)
        ax.set_yticks(pos)
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_xlabel("inference latency (s): median, whiskers min-max over repetitions")
        ax.grid(True, axis="x", alpha=0.3)
        if title:
            ax.set_title(title, fontsize=9)
    axes[0].invert_yaxis()  # shared: the first method on top in every panel
    fig.suptitle(_title(df, "Latency (one link profile)"), fontsize=10)
    _note(fig, df)
    return fig


def speedup_table(df: pd.DataFrame) -> pd.DataFrame:
    """Median latency per method and configuration, with ``single``'s in the same one and
    ``speedup`` = single_s / latency_s (NaN where the configuration has no single rows)."""
    ok = _ok(df)
    prof = [c for c in DIMENSIONS if c in ok and c != "trace"]  # every configuration column (trace rows: not here)
    med = (ok.groupby(["label", "method", *prof], sort=False, dropna=False)["latency_s"].median().reset_index())
    single = (med[med["method"] == "single"].groupby(prof, dropna=False)["latency_s"].median()
              .rename("single_s").reset_index())
    out = med.merge(single, on=prof, how="left")
    out["speedup"] = out["single_s"] / out["latency_s"]
    return out


def speedup_figure(df: pd.DataFrame) -> Figure:
    """Speed-up over one device (single's median latency / method's) vs the swept axis."""
    ok = _ok(df)
    axis = sweep_axis(ok)
    tab = speedup_table(df)
    if axis is None:  # one profile: a bar per method
        tab = tab.assign(profile=0.0)
    xcol = axis or "profile"
    facets = _facets(tab, facet_axes(tab, axis)) if axis else [("", tab)]
    fig, axes = _panels(len(facets), 5.2, 3.8, sharey=True)
    colors = _colors(ok)
    for ax, (title, t) in zip(axes, facets):
        if t["single_s"].isna().all():
            ax.text(0.5, 0.5, "no `single` rows: nothing to compare with", ha="center", va="center",
                    transform=ax.transAxes)
        for lab in colors:
            r = t[(t["label"] == lab) & t["speedup"].notna() & (t["method"] != "single")]
            if len(r):
                ax.plot(r[xcol], r["speedup"], marker="o", color=colors[lab], label=lab)
        ax.axhline(1.0, color="0.3", linestyle="--", linewidth=1, label="single device (1x)")
        if axis:
            _setup_x(ax, ok, axis)
        else:
            ax.set_xticks([])
            ax.set_xlabel("one link profile (see title)")
        _log_panel(ax, title, "x")
    return _finish_panels(fig, axes, df, "speed-up over single device", "above 1x: faster than one device",
                          "Speed-up over one device (median latencies)")


def breakdown_figure(df: pd.DataFrame) -> Figure:
    """Stacked compute / communication seconds (critical rank, medians) per method, one panel per profile."""
    ok = _ok(df)
    axis = sweep_axis(ok)
    cols = ([axis] if axis else []) + facet_axes(ok, axis)
    every = _facets(ok, cols)
    profiles = every[:MAX_PANELS]
    labels = _labels(ok)
    colors = _colors(ok)
    fig, axes = _panels(len(profiles), 4.2, 3.4)
    pos = np.arange(len(labels))
    for k, (ax, (title, d)) in enumerate(zip(axes, profiles)):
        g = d.groupby("label", sort=False)[["compute_s", "comm_s", "latency_s"]].median().reindex(labels)
        ax.bar(pos, g["compute_s"], color=[colors[lab] for lab in labels], label="compute")
        ax.bar(pos, g["comm_s"], bottom=g["compute_s"], color=[colors[lab] for lab in labels], alpha=0.35,
               hatch="//", edgecolor="0.3", linewidth=0.4, label="communication")
        ax.scatter(pos, g["latency_s"], marker="_", s=300, color="black", zorder=3, label="measured latency")
        ax.set_xticks(pos)
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=7)
        ax.set_title(title or "one link profile", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        if k % 3 == 0:
            ax.set_ylabel("seconds (critical rank)")
        if k == 0:
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(_title(df, "Compute vs communication per method"), fontsize=10)
    _note(fig, df, "solid: compute, hatched: communication incl. waiting for peers (medians)"
          + (f"; the first {len(profiles)} of {len(every)} configurations (testbed.experiment.report lists all)"
             if len(every) > len(profiles) else ""))
    return fig


def trace_figure(df: pd.DataFrame, schedules: dict[str, tuple[list, float, bool]] | None = None) -> Figure:
    """Latency of each repetition against seconds since its method's replay of the trace started (every
    method replays the trace from its start), over the trace's bandwidth steps; a panel per trace (and per
    combination of the other dimensions that vary, bandwidth aside: the trace sets it). ``schedules``: trace
    name -> (points [(time_s, bandwidth_mbps)], period_s, loop); without it the steps are those sampled by
    the rows."""
    d = df[(df["status"] == "ok") & (_trace(df) != "")]
    panels = _facets(d, ["trace", *(c for c in varying(d) if c not in ("trace", "bandwidth_mbps", "faults"))])
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3.8 * len(panels) + 1.2), squeeze=False,
                             layout="constrained")
    colors = _colors(d)
    for ax, (title, t) in zip(axes[:, 0], panels):
        name = t["trace"].iloc[0]
        bx, by = _steps(t, (schedules or {}).get(name))
        twin = ax.twinx()
        twin.step(bx, by, where="post", color="0.55", linestyle="--", linewidth=1,
                  label="trace bandwidth (right axis)")
        twin.set_ylabel("bandwidth (Mbit/s)", color="0.4")
        twin.set_ylim(bottom=0)
        for lab in colors:
            r = t[t["label"] == lab].sort_values("trace_time_s")
            if len(r):
                ax.plot(r["trace_time_s"], r["latency_s"], marker="o", linestyle="-", color=colors[lab], label=lab)
        _ring_hits(ax, t, "trace_time_s")
        ax.set_xlabel(f"time since the method's replay of trace '{name}' started (s)")
        ax.set_ylabel("inference latency (s)")
        ax.set_title(title, fontsize=9)
        _log_y(ax)
        ax.grid(True, alpha=0.3)
        ax.set_zorder(twin.get_zorder() + 1)  # latency markers above the bandwidth steps
        ax.patch.set_visible(False)
    _legend(fig, [*axes[:, 0], *[a for a in fig.axes if a not in axes[:, 0]]])
    fig.suptitle(_title(df, "Latency under a bandwidth trace", d.drop(columns="bandwidth_mbps")), fontsize=10)
    return fig


def _ring_hits(ax, rows: pd.DataFrame, x: str) -> None:
    """A black ring around every repetition a scheduled fault hit."""
    hit = rows[_text(rows, "faults") != ""]
    if len(hit):
        ax.scatter(hit[x], hit["latency_s"], s=140, facecolors="none", edgecolors="black", linewidths=1.2,
                   zorder=4, label="hit by a scheduled fault")


def fault_figure(df: pd.DataFrame, events: list[dict] | None = None) -> Figure:
    """Latency of each repetition against device seconds since its unit's repetitions started (when the
    faults' clock starts), one line per method; ringed: repetitions a fault hit; a cross on the time axis:
    a repetition that failed (e.g. its node was killed). ``events``: the experiment's fault events
    (``name``, ``at_s``, ``duration_s``: FaultSpec.to_dict), shaded over the time they are scheduled to
    last (to the panel's end without a duration). One panel per configuration (every dimension that
    varies, the faults that hit aside)."""
    d = _fault_rows(df).copy()
    d.loc[_trace(d) != "", "bandwidth_mbps"] = np.nan  # a trace sets the bandwidth of its rows
    every = _facets(d, [c for c in varying(d) if c != "faults"])
    panels = every[:MAX_PANELS]
    fig, axes = _panels(len(panels), 5.2, 3.6, sharey=True)
    colors = _colors(d)
    shades = plt.get_cmap("Reds")
    end = float((d["fault_time_s"] + d["latency_s"].fillna(0)).max())
    for ax, (title, t) in zip(axes, panels):
        ok = t[t["status"] == "ok"]
        for lab in colors:
            r = ok[ok["label"] == lab].sort_values("fault_time_s")
            if len(r):
                ax.plot(r["fault_time_s"], r["latency_s"], marker="o", linestyle="-", color=colors[lab], label=lab)
        _ring_hits(ax, ok, "fault_time_s")
        failed = t[t["status"] != "ok"]
        if len(failed):
            ax.scatter(failed["fault_time_s"], [0.02] * len(failed), marker="x", s=60, color="crimson", zorder=4,
                       transform=ax.get_xaxis_transform(), label="failed repetition (see rows.csv)")
        for k, ev in enumerate(events or []):
            dur = ev.get("duration_s")
            stop = ev["at_s"] + dur if dur is not None else max(end, ev["at_s"])
            ax.axvspan(ev["at_s"], stop, color=shades(0.25 + 0.5 * k / max(1, len(events) - 1)), alpha=0.3,
                       linewidth=0, zorder=0, label=f"fault {ev['name']}")
        ax.set_xlabel("device time since the method's repetitions started (s)")
        _log_panel(ax, title)
    note = "one point per repetition, at its start"
    if len(every) > len(panels):
        note += f"; the first {len(panels)} of {len(every)} configurations"
    axes[0].set_ylabel("inference latency (s)")
    _legend(fig, axes, note)
    fig.suptitle(_title(df, "Latency over time under scheduled faults", d), fontsize=10)
    return fig


def _steps(rows: pd.DataFrame, schedule: tuple[list, float, bool] | None) -> tuple[list, list]:
    """x, y of the bandwidth steps over the time the rows span (the schedule looped as the replay did)."""
    end = float(rows["trace_time_s"].max() + rows["latency_s"].max())
    if schedule is None:
        r = rows.sort_values("trace_time_s")
        return list(r["trace_time_s"]) + [end], list(r["bandwidth_mbps"]) + [r["bandwidth_mbps"].iloc[-1]]
    points, period, loop = schedule
    xs, ys, base = [], [], 0.0
    while base <= end:
        for t, bw in points:
            xs.append(base + t)
            ys.append(bw)
        if not loop:
            break
        base += period
    return xs + [max(end, xs[-1])], ys + [ys[-1]]


HEATMAP_CMAP = "RdBu"  # diverging, ColorBrewer's colour-blind-safe set: red slower, white 1x, blue faster


def heatmap_axes(df: pd.DataFrame) -> tuple[str, str] | None:
    """(x, y) of the speed-up heatmaps: bandwidth and delay when both vary in the measured rows, else
    bandwidth and the first other link column of ``AXES`` that varies; None when bandwidth or every
    other link column has one value (no heatmap then)."""
    ok = _ok(df)
    vary = [c for c in AXES if c in ok and ok[c].dropna().nunique() > 1]
    return ("bandwidth_mbps", vary[1]) if vary[:1] == ["bandwidth_mbps"] and len(vary) > 1 else None


def speedup_grid(df: pd.DataFrame) -> pd.DataFrame:
    """What the speed-up heatmaps show: one row per label, configuration and ``versus``.

    ``versus`` "single": ``single``'s median latency in the same configuration over the label's
    (``speedup_table``; single's own label left out). ``versus`` "best baseline": the best baseline's
    median over the label's, where a *baseline* is a multi-device method other than ASTRA
    (``report.BASELINES``, as in the comparison table: tensor, sequence (fp32 and int8) and block
    parallel) and the best one is the fastest baseline label in that configuration other than the label itself
    (``reference``: which one; a label with no other baseline in a configuration has no such row).
    Medians over repetitions of measured rows (``_ok``). Empty when ``heatmap_axes`` is None."""
    if heatmap_axes(df) is None:
        return pd.DataFrame(columns=["label", "method", "versus", "reference", "reference_s", "latency_s", "speedup"])
    tab = speedup_table(df)
    prof = [c for c in DIMENSIONS if c in tab]
    single = tab[tab["method"] != "single"].assign(versus="single", reference="single", reference_s=tab["single_s"])
    best = []
    for _, g in tab.groupby(prof, sort=False, dropna=False):
        base = g[g["method"].isin(BASELINES)]
        for _, r in g.iterrows():
            others = base[base["label"] != r["label"]]
            if len(others):  # else the label has no baseline to compare with in this configuration
                ref = others.loc[others["latency_s"].idxmin()]
                best.append({**r.to_dict(), "versus": "best baseline", "reference": ref["label"],
                             "reference_s": ref["latency_s"]})
    out = pd.concat([single, pd.DataFrame(best)], ignore_index=True).drop(columns=["single_s", "speedup"])
    out["speedup"] = out["reference_s"] / out["latency_s"]
    return out[[*prof, "label", "method", "versus", "reference", "reference_s", "latency_s", "speedup"]]


def _heatmap_norm(grid: pd.DataFrame) -> matplotlib.colors.LogNorm:
    """One colour scale for every heatmap of the run: log, symmetric about 1 (1/m .. m)."""
    v = grid["speedup"].to_numpy(dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    m = float(np.exp(np.abs(np.log(v)).max())) if len(v) else 2.0
    m = max(m, 1.25)  # all cells near 1: keep them pale instead of stretching the scale
    return matplotlib.colors.LogNorm(vmin=1 / m, vmax=m)


def speedup_heatmap_figure(df: pd.DataFrame, versus: str = "single") -> Figure:
    """Speed-up of each label over ``versus`` ("single" or "best baseline", see ``speedup_grid``) in
    every cell of bandwidth x delay (``heatmap_axes``), the value written in the cell; a column per
    label, a row per combination of the other dimensions that vary. One colour scale (diverging,
    centred on 1x, log) shared by every panel of both figures of the run."""
    grid = speedup_grid(df)
    x, y = heatmap_axes(df)
    norm = _heatmap_norm(grid)
    g = grid[grid["versus"] == versus]
    labels = _labels(g)
    every = _facets(g, [c for c in varying(g) if c not in (x, y, "label", "method")])
    rows = every[:max(1, MAX_PANELS // max(1, len(labels)))]
    xs, ys = sorted(grid[x].dropna().unique()), sorted(grid[y].dropna().unique())
    fig, axes = plt.subplots(len(rows), len(labels), figsize=(max(2.8, 0.75 * len(xs)) * len(labels) + 1.5,
                             (0.55 * len(ys) + 1.3) * len(rows) + 1.4), squeeze=False, layout="constrained")
    cmap = plt.get_cmap(HEATMAP_CMAP)
    for i, (title, t) in enumerate(rows):
        for j, lab in enumerate(labels):
            ax = axes[i, j]
            m = t[t["label"] == lab].pivot_table(index=y, columns=x, values="speedup", dropna=False)
            m = m.reindex(index=ys, columns=xs)
            im = ax.imshow(m.to_numpy(dtype=float), origin="lower", cmap=cmap, norm=norm, aspect="auto")
            for (r, c), v in np.ndenumerate(m.to_numpy(dtype=float)):
                dark = np.isfinite(v) and abs(np.log(v)) > 0.6 * np.log(norm.vmax)
                ax.text(c, r, f"{v:.3g}x" if np.isfinite(v) else "n/a", ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
            ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
            ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys])
            ax.set_xlabel(AXES[x][0])
            if j == 0:
                ax.set_ylabel(AXES[y][0])
            ax.set_title(lab + (f"\n{title}" if title else ""), fontsize=9)
    bar = fig.colorbar(im, ax=axes, shrink=0.8, label=f"speed-up over {versus} (median latencies)")
    _log_ticks(bar.ax.yaxis, norm.vmin, norm.vmax, "x")
    what = ("single's median latency / the method's" if versus == "single" else
            "the best baseline's median latency / the method's\n(baselines: tensor, sequence (int8) and block parallel; the best: "
            "the fastest other than the method itself in each cell)")
    if len(every) > len(rows):
        what += f"; the first {len(rows)} of {len(every)} configurations"
    _note(fig, df, what)
    fig.suptitle(_title(df, f"Speed-up over {versus} per link profile"), fontsize=10)
    return fig


def cdf_panels(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(title, rows) of the latency CDF's panels: one per configuration with loss > 0 (its repetitions
    that no scheduled fault hit, on fixed link profiles), then one per configuration whose units a
    scheduled fault hit (every repetition of those units: hit or not, failed ones too)."""
    fixed = df[(_trace(df) == "") & (_text(df, "faults") == "")]
    lossy = fixed[fixed["loss_pct"].fillna(0) > 0] if "loss_pct" in fixed else fixed.iloc[:0]
    cols = [c for c in DIMENSIONS if c in lossy and c not in ("trace", "faults")
            and (c == "loss_pct" or lossy[c].nunique(dropna=False) > 1)]
    out = _facets(lossy, cols) if len(lossy) else []
    d = _fault_rows(df)
    hit = d.groupby(["cell", "label"], sort=False)["faults"].transform(
        lambda f: (f.map(lambda v: isinstance(v, str) and v != "")).any()) if len(d) else d.index
    d = d[hit.astype(bool)] if len(d) else d
    for title, t in (_facets(d, [c for c in varying(d) if c != "faults"]) if len(d) else []):
        names = sorted(set(_text(t, "faults")) - {""})
        out.append((f"units hit by {', '.join(names)}" + (f"\n{title}" if title else ""), t))
    return out


def latency_cdf_figure(df: pd.DataFrame) -> Figure:
    """Empirical CDF of each label's latency over its repetitions, a panel per ``cdf_panels``; a failed
    repetition counts as never finishing, so the label's curve stays below 1 by its share."""
    every = cdf_panels(df)
    panels = every[:MAX_PANELS]
    fig, axes = _panels(len(panels), 4.6, 3.4, sharey=True)
    colors = _colors(pd.concat([t for _, t in panels]))
    for ax, (title, t) in zip(axes, panels):
        done = t.loc[t["status"] == "ok", "latency_s"].dropna()
        lo, hi = (float(done.min()) / 1.15, float(done.max()) * 1.15) if len(done) else (0.1, 1.0)
        for lab in colors:
            r = t[t["label"] == lab]
            lat = np.sort(r.loc[r["status"] == "ok", "latency_s"].dropna().to_numpy(dtype=float))
            if len(lat):  # from 0 at the panel's left edge to its share finished at the right edge
                share = np.arange(len(lat) + 1) / len(r)
                ax.step(np.r_[lo, lat, hi], np.r_[share, share[-1]], where="post", color=colors[lab], label=lab)
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        _log_ticks(ax.xaxis, lo, hi)
        ax.set_xlabel("inference latency (s)")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("share of repetitions finished")
    note = "a failed repetition never finishes (its curve stays below 1)"
    if len(every) > len(panels):
        note += f"; the first {len(panels)} of {len(every)} configurations"
    _legend(fig, axes, note)
    kinds = [k for k, hit in (("packet loss", any(not t.startswith("units hit") for t, _ in panels)),
                              ("scheduled faults", any(t.startswith("units hit") for t, _ in panels))) if hit]
    fig.suptitle(_title(df, f"Latency distribution under {' and '.join(kinds)}",
                        pd.concat([t for _, t in panels])), fontsize=10)
    return fig


def figures(df: pd.DataFrame, schedules: dict | None = None, events: list[dict] | None = None) -> dict[str, Figure]:
    """Every figure that applies to these rows, by file stem (``schedules``: see trace_figure; ``events``:
    see fault_figure)."""
    out: dict[str, Figure] = {}
    if len(_ok(df)):
        out["latency"] = latency_figure(df)
        out["speedup"] = speedup_figure(df)
        out["breakdown"] = breakdown_figure(df)
    if ((_trace(df) != "") & (df["status"] == "ok")).any():
        out["trace"] = trace_figure(df, schedules)
    if len(_fault_rows(df)):
        out["faults"] = fault_figure(df, events)
    grid = speedup_grid(df)
    for versus, stem in (("single", "speedup_heatmap_single"), ("best baseline", "speedup_heatmap_baseline")):
        if grid.loc[grid["versus"] == versus, "speedup"].notna().any():
            out[stem] = speedup_heatmap_figure(df, versus)
    if cdf_panels(df):
        out["latency_cdf"] = latency_cdf_figure(df)
    return out


def save_all(df: pd.DataFrame, out_dir: str | Path, schedules: dict | None = None,
             events: list[dict] | None = None) -> list[Path]:
    """Write every applicable figure as PNG, SVG and PDF; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, fig in figures(df, schedules, events).items():
        for ext in ("png", "svg", "pdf"):
            p = out / f"{stem}.{ext}"
            fig.savefig(p, dpi=130 if ext == "png" else None)
            paths.append(p)
        plt.close(fig)
    return paths
