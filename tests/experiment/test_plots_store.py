"""Result store (append-only CSV that survives a torn last line, traces kept per recorded row) and
plots as pure functions of the rows (speed-up numbers, one line per method, one panel per profile)."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from testbed.experiment.plots import (breakdown_figure, latency_figure, save_all, speedup_figure, speedup_table,
                                      trace_figure)
from testbed.experiment.store import COLUMNS, ResultStore, read_rows, read_traces


def row(method: str, bw: float, rep: int, latency: float, delay: float = 0.0, status: str = "ok", **kw) -> dict:
    base = {c: None for c in COLUMNS}
    base.update(experiment="t", backend="mininet", mechanism="htb+nfqueue", cell=f"{method}@{bw}/{delay}",
                method=method, method_params="{}", label=method, model="vit-tiny", tokens=17, batch=1, nodes=4,
                topology="star", bandwidth_mbps=bw, delay_ms=delay, jitter_ms=0.0, loss_pct=0.0, trace="",
                repetition=rep, latency_s=latency, compute_s=latency / 2, comm_s=latency / 2, bytes_sent=100,
                status=status, error="" if status == "ok" else "boom")
    base.update(kw)
    return base


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def rows() -> pd.DataFrame:
    data = []
    for bw in (10.0, 100.0):
        for rep, jitter in enumerate((0.9, 1.0, 1.3)):
            data.append(row("single", bw, rep, 1.0 * jitter))
            data.append(row("astra", bw, rep, (0.5 if bw == 10 else 0.25) * jitter))
            data.append(row("tensor_parallel", bw, rep, (8.0 if bw == 10 else 2.0) * jitter))
    data.append(row("tensor_parallel", 10.0, 3, math.nan, status="error"))
    return pd.DataFrame(data, columns=COLUMNS)


def test_speedup_table_is_single_median_over_method_median(rows):
    tab = speedup_table(rows).set_index(["method", "bandwidth_mbps"])
    assert tab.loc[("astra", 10.0), "speedup"] == pytest.approx(2.0)
    assert tab.loc[("astra", 100.0), "speedup"] == pytest.approx(4.0)
    assert tab.loc[("tensor_parallel", 10.0), "speedup"] == pytest.approx(1 / 8)
    assert tab.loc[("single", 100.0), "speedup"] == pytest.approx(1.0)


def test_figures_have_a_line_per_method_and_log_bandwidth_axis(rows):
    fig = latency_figure(rows)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "Mbit/s" in ax.get_xlabel() and "(s)" in ax.get_ylabel()
    assert [ln.get_label() for ln in ax.get_lines()] == ["single", "astra", "tensor_parallel"]
    assert list(ax.get_lines()[1].get_ydata()) == pytest.approx([0.5, 0.25])  # medians
    assert "1 failed row" in fig.legends[0].get_title().get_text()
    sp = speedup_figure(rows).axes[0]
    assert {ln.get_label() for ln in sp.get_lines()} == {"tensor_parallel", "astra", "single device (1x)"}
    assert len(breakdown_figure(rows).axes) == 2  # one panel per bandwidth


def test_other_swept_axes_become_panels(rows):
    more = pd.concat([rows, rows.assign(delay_ms=5.0, latency_s=rows["latency_s"] + 1)], ignore_index=True)
    fig = latency_figure(more)
    assert [ax.get_title() for ax in fig.axes] == ["one-way link delay 0 ms", "one-way link delay 5 ms"]


def _astra_points(ax) -> list[float]:
    return list(next(ln for ln in ax.get_lines() if ln.get_label() == "astra").get_ydata())


@pytest.mark.parametrize("col, values, title", [
    ("delay_ms", (0.0, 5.0), "one-way link delay {:g} ms"),
    ("loss_pct", (0.0, 2.0), "packet loss {:g} %"),
])
def test_two_values_of_a_link_axis_are_separate_points_in_every_figure(rows, col, values, title):
    """Each value gets its own series (astra is 1 s slower at the second): never one merged median."""
    a, b = values
    more = pd.concat([rows.assign(**{col: a}), rows.assign(**{col: b}, latency_s=rows["latency_s"] + 1)],
                     ignore_index=True)
    lat = latency_figure(more)
    assert [ax.get_title() for ax in lat.axes] == [title.format(v) for v in values]
    assert _astra_points(lat.axes[0]) == pytest.approx([0.5, 0.25])
    assert _astra_points(lat.axes[1]) == pytest.approx([1.5, 1.25])
    sp = speedup_figure(more)
    assert [ax.get_title() for ax in sp.axes] == [title.format(v) for v in values]
    assert _astra_points(sp.axes[0]) == pytest.approx([2.0, 4.0])
    assert _astra_points(sp.axes[1]) == pytest.approx([2.0 / 1.5, 2.0 / 1.25])
    tab = speedup_table(more)
    assert len(tab) == 3 * 2 * 2 and not tab.duplicated(["label", "bandwidth_mbps", col]).any()
    bd = breakdown_figure(more)
    assert sorted(ax.get_title() for ax in bd.axes if ax.get_visible()) == sorted(
        f"link bandwidth {bw:g} Mbit/s, {title.format(v)}" for bw in (10, 100) for v in values)


def test_a_link_axis_swept_alone_is_the_x_axis(rows):
    alone = pd.concat([rows.assign(loss_pct=v, bandwidth_mbps=20.0, latency_s=rows["latency_s"] * (1 + v))
                       for v in (0.0, 1.0, 3.0)], ignore_index=True)
    fig = latency_figure(alone)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "packet loss (%)" and ax.get_xscale() == "linear"
    assert fig.get_suptitle().startswith("Latency at link bandwidth 20 Mbit/s\n")  # what every point shares
    assert list(next(ln for ln in ax.get_lines() if ln.get_label() == "astra").get_xdata()) == [0.0, 1.0, 3.0]


def test_dimensions_outside_the_link_profile_become_panels_too(rows):
    """Rows of two node counts (e.g. two runs' rows together): one panel each, the title no longer names one."""
    both = pd.concat([rows, rows.assign(nodes=8, latency_s=rows["latency_s"] / 2)], ignore_index=True)
    fig = latency_figure(both)
    assert [ax.get_title() for ax in fig.axes] == ["nodes 4", "nodes 8"]
    assert _astra_points(fig.axes[1]) == pytest.approx([0.25, 0.125])
    assert "nodes" not in fig.get_suptitle() and "17 tokens" in fig.get_suptitle()
    one = both[both["bandwidth_mbps"] == 10.0]  # one link profile: bars, still one panel per node count
    bars = latency_figure(one)
    assert [ax.get_title() for ax in bars.axes] == ["nodes 4", "nodes 8"]
    assert [p.get_width() for p in bars.axes[1].patches] == pytest.approx([0.5, 0.25, 4.0])


def test_the_breakdown_says_when_it_shows_only_some_configurations(rows):
    many = pd.concat([rows.assign(delay_ms=float(d)) for d in range(7)], ignore_index=True)  # 2 x 7 = 14
    fig = breakdown_figure(many)
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 12
    assert "the first 12 of 14 configurations" in fig.get_supxlabel()


def test_trace_cells_get_a_panel_per_trace(rows):
    fixed = rows[rows["bandwidth_mbps"] == 10.0]
    traced = []
    for name, slow in (("lte", 1.0), ("wifi", 3.0)):
        for i, (_, r) in enumerate(fixed[fixed["status"] == "ok"].iterrows()):
            traced.append({**r.to_dict(), "trace": name, "trace_time_s": float(i), "bandwidth_mbps": 5.0 + i % 2,
                           "latency_s": r["latency_s"] * slow})
    df = pd.concat([fixed, pd.DataFrame(traced)], ignore_index=True)
    fig = trace_figure(df)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["trace 'lte'", "trace 'wifi'"]
    assert max(_astra_points(panels[1])) == pytest.approx(3 * max(_astra_points(panels[0])))
    bars = latency_figure(df).axes[0].patches  # the fixed rows alone: one profile, a bar per method
    assert [p.get_width() for p in bars] == pytest.approx([1.0, 0.5, 8.0])


def test_save_all_writes_png_svg_and_pdf(rows, tmp_path):
    paths = save_all(rows, tmp_path / "plots")
    assert sorted(p.name for p in paths) == sorted(f"{s}.{e}" for s in ("latency", "speedup", "breakdown")
                                                  for e in ("png", "svg", "pdf"))
    assert all(p.stat().st_size > 1000 for p in paths)


def test_store_appends_survives_a_torn_line_and_keeps_traces_of_recorded_rows(tmp_path):
    with ResultStore(tmp_path) as store:
        store.append(row("single", 10.0, 0, 1.0, cell="p0/m0", error="multi\nline"), [{"rank": 0, "events": []}])
        store.append(row("single", 10.0, 1, 1.1, cell="p0/m0"), [{"rank": 0, "events": []}])
    with open(tmp_path / "rows.csv", "a") as f:  # a crash in the middle of writing a row
        f.write("t,mininet,htb+nfqueue,p0/m0,single")
    with open(tmp_path / "traces.jsonl", "a") as f:  # its trace got written, its row did not
        f.write('{"cell": "p0/m0", "repetition": 2, "ranks": []}\n')
    with ResultStore(tmp_path) as store:
        assert store.done() == {("p0/m0", 0), ("p0/m0", 1)}
        store.append(row("single", 10.0, 2, 1.2, cell="p0/m0"), [{"rank": 0, "events": [], "again": True}])
        store.write_parquet()
    df = read_rows(tmp_path)
    assert df["repetition"].tolist() == [0, 1, 2] and df["error"].iloc[0] == "multi line"
    assert pd.read_parquet(tmp_path / "rows.parquet")["latency_s"].tolist() == df["latency_s"].tolist()
    traces = read_traces(tmp_path)
    assert len(traces) == 3 and traces[-1]["ranks"][0]["again"] is True


def _fault_run(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` as a run with a 2 s link-down fault at 1 s: repetitions 1 s apart, repetition 1 of each
    method hit (2 s slower), astra's repetition 2 failed."""
    df = rows[rows["status"] == "ok"].copy()
    df["fault_time_s"] = df["repetition"].astype(float)
    df["faults"] = ""
    hit = df["repetition"] == 1
    df.loc[hit, "faults"] = "link_down:h2-s1@1s"
    df.loc[hit, "latency_s"] += 2.0
    failed = (df["method"] == "astra") & (df["repetition"] == 2)
    df.loc[failed, ["status", "latency_s"]] = ["error", math.nan]
    return df.reset_index(drop=True)


def test_fault_units_get_a_latency_over_time_figure(rows):
    from testbed.experiment.plots import figures

    df = _fault_run(rows)
    events = [{"name": "link_down:h2-s1@1s", "kind": "link_down", "at_s": 1.0, "duration_s": 2.0}]
    figs = figures(df, events=events)
    assert set(figs) == {"latency", "speedup", "breakdown", "faults", "latency_cdf"}  # fault-hit units: a CDF
    fig = figs["faults"]
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["link bandwidth 10 Mbit/s", "link bandwidth 100 Mbit/s"]
    ax = panels[0]
    assert ax.get_xlabel() == "device time since the method's repetitions started (s)"
    astra = next(ln for ln in ax.get_lines() if ln.get_label() == "astra")
    assert list(astra.get_xdata()) == [0.0, 1.0] and list(astra.get_ydata()) == pytest.approx([0.45, 2.5])
    rings = next(c for c in ax.collections if c.get_label() == "hit by a scheduled fault")
    assert sorted(map(tuple, rings.get_offsets())) == sorted(
        (1.0, lat) for lat in df[(df["bandwidth_mbps"] == 10) & (df["faults"] != "")]["latency_s"])
    crosses = next(c for c in ax.collections if c.get_label() == "failed repetition (see rows.csv)")
    assert [x for x, _ in crosses.get_offsets()] == [2.0]
    span = next(p for p in ax.patches if p.get_label() == "fault link_down:h2-s1@1s")
    assert span.get_x() == 1.0 and span.get_width() == 2.0
    # the other figures leave the hit repetitions out of their medians and say so
    lat = figs["latency"]
    astra = next(ln for ln in lat.axes[0].get_lines() if ln.get_label() == "astra")
    assert list(astra.get_ydata()) == pytest.approx([0.45, 0.225])  # repetition 0 alone (1 hit, 2 failed)
    assert "6 row(s) hit by scheduled faults not plotted here" in lat.legends[0].get_title().get_text()


def test_a_run_without_faults_has_no_fault_figure(rows):
    from testbed.experiment.plots import figures

    assert "faults" not in figures(rows.assign(faults="", fault_time_s=math.nan))


def test_a_method_has_one_colour_in_every_plot_and_run(rows):
    import matplotlib.colors

    from testbed.experiment.plots import METHOD_COLORS, _colors

    one = pd.DataFrame({"method": ["single", "astra", "astra"], "label": ["single", "astra G=1", "astra G=32"]})
    other = pd.DataFrame({"method": ["astra", "tensor_parallel"], "label": ["astra G=1", "tp"]})
    a, b = _colors(one), _colors(other)
    assert a["astra G=1"] == b["astra G=1"] == pytest.approx(matplotlib.colors.to_rgb(METHOD_COLORS["astra"]))
    assert a["astra G=32"] != a["astra G=1"] and b["tp"] == pytest.approx(matplotlib.colors.to_rgb("#E69F00"))
    lines = {ln.get_label(): ln.get_color() for ln in latency_figure(rows).axes[0].get_lines()}
    assert lines and all(matplotlib.colors.to_hex(c) in map(str.lower, METHOD_COLORS.values())
                         for lab, c in lines.items() if not lab.startswith("_"))
