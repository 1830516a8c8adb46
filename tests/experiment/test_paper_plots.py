"""The figures papers show: speed-up heatmaps over bandwidth x delay and latency CDFs under loss and
faults, drawn by save_all when a run's rows call for them and never otherwise; the heatmap's
numbers are the medians' ratios recomputed here from rows.csv."""

from __future__ import annotations

import math

import matplotlib.colors
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from testbed.experiment import api
from testbed.experiment.plots import (METHOD_COLORS, cdf_panels, heatmap_axes, latency_cdf_figure, save_all,
                                      speedup_grid, speedup_heatmap_figure)
from testbed.experiment.store import COLUMNS
from testbed.experiment.report import BASELINES
from tests.experiment.helpers import tiny
from tests.experiment.test_plots_store import _fault_run, row

METHODS = ["single", "sequence_parallel", {"name": "astra", "params": {"groups": 1, "codebook_size": 16}}]
PAPER = ("speedup_heatmap_single", "speedup_heatmap_baseline", "latency_cdf")
GRID = ["bandwidth_mbps", "delay_ms", "loss_pct"]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _sim(tmp, sweep: dict):
    exp = api.experiment(tiny(methods=METHODS, backend="sim", repetitions=3, sweep=sweep))
    return api.run(exp, out=tmp / "run", settings={"calibration": str(tmp / "calibration")})


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    return _sim(tmp_path_factory.mktemp("grid"), {"bandwidth_mbps": [10, 100], "delay_ms": [0, 5],
                                                  "loss_pct": [0, 1]})


def test_a_bandwidth_delay_loss_run_writes_the_heatmaps_and_the_cdf(grid_run):
    names = {p.name for p in (grid_run.dir / "plots").iterdir()}
    assert {f"{s}.{e}" for s in PAPER for e in ("png", "svg", "pdf")} <= names
    page = grid_run.report.read_text()
    shown = [page.index(f'alt="{s}"') for s in ("latency", "speedup", *PAPER[:2], "breakdown", PAPER[2])]
    assert shown == sorted(shown)  # the paper order, not the files' names
    assert "speedup_heatmap_baseline: speed-up over the best multi-device baseline (TP, SP, SP-int8, BP)" in page


def test_a_bandwidth_only_run_writes_neither(tmp_path):
    run = _sim(tmp_path, {"bandwidth_mbps": [10, 100]})
    names = {p.stem for p in (run.dir / "plots").iterdir()}
    assert names == {"latency", "speedup", "breakdown"}
    assert heatmap_axes(run.rows) is None and speedup_grid(run.rows).empty and cdf_panels(run.rows) == []


def _expected(run) -> pd.DataFrame:
    """Speed-ups from rows.csv alone: medians per label and cell, single's / the label's, and the
    fastest multi-device baseline label's other than the label itself / the label's (NaN: none)."""
    raw = pd.read_csv(run.dir / "rows.csv")
    med = raw[raw["status"] == "ok"].groupby([*GRID, "label", "method"])["latency_s"].median().reset_index()
    out = []
    for _, cell in med.groupby(GRID):
        single = cell.loc[cell["method"] == "single", "latency_s"].iloc[0]
        for _, r in cell.iterrows():
            base = cell[cell["method"].isin(BASELINES) & (cell["label"] != r["label"])]
            out.append({**{c: r[c] for c in GRID}, "label": r["label"], "best baseline": base["latency_s"].min()
                        / r["latency_s"], "single": single / r["latency_s"] if r["method"] != "single" else np.nan})
    return pd.DataFrame(out).set_index([*GRID, "label"])


def test_the_heatmaps_show_the_medians_ratios_from_rows_csv(grid_run):
    rows = grid_run.rows
    assert heatmap_axes(rows) == ("bandwidth_mbps", "delay_ms")
    want = _expected(grid_run)
    grid = speedup_grid(rows)
    assert len(grid) == want["single"].notna().sum() + want["best baseline"].notna().sum()
    for versus in ("single", "best baseline"):
        got = grid[grid["versus"] == versus].set_index([*GRID, "label"])["speedup"]
        assert got.to_numpy() == pytest.approx(want.loc[got.index, versus].to_numpy(), rel=1e-9)
        # the figure: a panel per label (columns) and loss value (rows), bandwidth across, delay up
        fig = speedup_heatmap_figure(rows, versus)
        panels = [ax for ax in fig.axes if ax.images]
        labels = list(dict.fromkeys(got.index.get_level_values("label")))
        assert len(panels) == 2 * len(labels)
        norms = set()
        for k, ax in enumerate(panels):
            loss, lab = (0.0, 1.0)[k // len(labels)], labels[k % len(labels)]
            assert ax.get_title() == f"{lab}\npacket loss {loss:g} %"
            assert ax.get_xlabel() == "link bandwidth (Mbit/s)"
            if k % len(labels) == 0:
                assert ax.get_ylabel() == "one-way link delay (ms)"
            shown = ax.images[0].get_array()
            cells = [[want.loc[(bw, d, loss, lab), versus] for bw in (10.0, 100.0)] for d in (0.0, 5.0)]
            assert np.asarray(shown) == pytest.approx(np.array(cells), rel=1e-9)
            texts = [t.get_text() for t in ax.texts]
            assert texts == [f"{v:.3g}x" for line in cells for v in line]
            norms.add((ax.images[0].norm.vmin, ax.images[0].norm.vmax))
        assert len(norms) == 1  # one colour scale
        vmin, vmax = norms.pop()
        assert vmin * vmax == pytest.approx(1.0) and vmax >= grid["speedup"].max()  # centred on 1x, all in range
        assert ax.images[0].get_cmap().name == "RdBu"


def test_the_best_baseline_is_the_fastest_multi_device_method_other_than_itself():
    """As in the comparison table (report.BASELINES): single and astra labels are never baselines, a
    method is never its own, and a label with no other baseline gets no best-baseline cell."""
    data = []
    for bw in (10.0, 100.0):
        for d in (0.0, 5.0):
            data += [row("single", bw, 0, 1.0, delay=d), row("tensor_parallel", bw, 0, 0.5 if bw == 100 else 4.0,
                                                                 delay=d),
                     row("astra", bw, 0, 0.25, delay=d, label="astra G=1"),
                     row("astra", bw, 0, 0.2, delay=d, label="astra G=32")]
    df = pd.DataFrame(data, columns=COLUMNS)
    g = speedup_grid(df)
    g = g[g["versus"] == "best baseline"].set_index(["label", "bandwidth_mbps", "delay_ms"])
    assert g.loc[("astra G=1", 10.0, 0.0), "reference"] == "tensor_parallel"  # though single is faster there
    assert g.loc[("astra G=1", 10.0, 0.0), "speedup"] == pytest.approx(16.0)  # not vs astra G=32
    assert g.loc[("astra G=1", 100.0, 5.0), "speedup"] == pytest.approx(2.0)
    assert g.loc[("single", 100.0, 0.0), "reference"] == "tensor_parallel"
    assert "tensor_parallel" not in g.index.get_level_values("label")  # the only baseline: none to compare with
    assert heatmap_axes(df.assign(delay_ms=0.0, loss_pct=df["delay_ms"] / 5)) == ("bandwidth_mbps", "loss_pct")
    assert heatmap_axes(df.assign(bandwidth_mbps=10.0)) is None


def _curves(ax) -> dict[str, tuple[list, list]]:
    return {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()
            if not ln.get_label().startswith("_")}


def test_the_cdf_has_a_panel_per_lossy_cell_and_a_line_per_method_in_its_colour(grid_run):
    rows = grid_run.rows
    panels = cdf_panels(rows)
    assert [t for t, _ in panels] == [f"link bandwidth {bw} Mbit/s, one-way link delay {d} ms, packet loss 1 %"
                                      for bw in (10, 100) for d in (0, 5)]
    fig = latency_cdf_figure(rows)
    ax = fig.axes[0]
    curves = _curves(ax)
    assert set(curves) == set(rows["label"])
    cell = rows[(rows["bandwidth_mbps"] == 10) & (rows["delay_ms"] == 0) & (rows["loss_pct"] == 1)]
    for lab, (xs, ys) in curves.items():
        lat = sorted(cell.loc[cell["label"] == lab, "latency_s"])
        assert xs[1:-1] == pytest.approx(lat) and ys[0] == 0 and ys[-1] == 1
    colours = {ln.get_label(): matplotlib.colors.to_hex(ln.get_color()) for ln in ax.get_lines()}
    assert colours["single"] == METHOD_COLORS["single"].lower() and colours["sequence_parallel"] == "#56b4e9"
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "inference latency (s)"


def test_the_cdf_of_fault_hit_units_stays_below_one_by_the_failed_share():
    base = []
    for bw in (10.0, 100.0):
        for rep, jitter in enumerate((0.9, 1.0, 1.3)):
            base += [row("single", bw, rep, 1.0 * jitter), row("astra", bw, rep, 0.5 * jitter)]
    df = _fault_run(pd.DataFrame(base, columns=COLUMNS))  # rep 1 hit, astra's rep 2 failed
    panels = cdf_panels(df)
    assert [t for t, _ in panels] == [f"units hit by link_down:h2-s1@1s\nlink bandwidth {bw} Mbit/s"
                                      for bw in (10, 100)]
    curves = _curves(latency_cdf_figure(df).axes[0])
    assert curves["astra"][0][1:-1] == pytest.approx([0.45, 2.5]) and curves["astra"][1][-1] == pytest.approx(2 / 3)
    assert curves["single"][1][-1] == 1
    assert cdf_panels(df.assign(faults="")) == []  # no unit hit: no panel


def test_save_all_draws_them_for_synthetic_rows_too(tmp_path):
    rows = pd.DataFrame([row(m, bw, 0, lat * (1 + d), delay=d) for bw in (10.0, 100.0) for d in (0.0, 5.0)
                         for m, lat in (("single", 1.0), ("astra", 0.5))], columns=COLUMNS)
    stems = {p.stem for p in save_all(rows, tmp_path / "a")}
    assert "speedup_heatmap_single" in stems and "latency_cdf" not in stems
    assert "speedup_heatmap_baseline" not in stems  # no multi-device baseline ran
    rows = pd.concat([rows, rows[rows["method"] == "single"].assign(method="tensor_parallel", label="tensor_parallel")])
    assert "speedup_heatmap_baseline" in {p.stem for p in save_all(rows, tmp_path / "b")}
    assert not math.isnan(speedup_grid(rows)["speedup"].iloc[0])
