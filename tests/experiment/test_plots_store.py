"""Result store (append-only CSV that survives a torn last line, traces kept per recorded row) and
plots as pure functions of the rows (speed-up numbers, one line per method, one panel per profile)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from testbed.experiment.plots import breakdown_figure, latency_figure, save_all, speedup_figure, speedup_table
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


def test_save_all_writes_png_and_svg(rows, tmp_path):
    paths = save_all(rows, tmp_path / "plots")
    assert sorted(p.name for p in paths) == sorted(f"{s}.{e}" for s in ("latency", "speedup", "breakdown")
                                                  for e in ("png", "svg"))
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
