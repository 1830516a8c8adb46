"""End to end without root: `testbed run` on the inprocess and loopback backends (real methods, real
gRPC node processes for loopback) and on the simulator, writing rows for every method x profile x
repetition, traces, a manifest and the plots."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from testbed.comm.inprocess import InProcessGroup
from testbed.experiment.cli import run_main
from testbed.experiment.store import COLUMNS, read_rows, read_traces
from testbed.methods import build_method
from testbed.models import build_model

from .helpers import tiny, write

EXACT = {"single", "tensor_parallel", "sequence_parallel"}  # equal to the unsharded model up to float rounding
PLOTS = {f"{s}.{e}" for s in ("latency", "speedup", "breakdown") for e in ("png", "svg", "pdf")}
#: drawn too where bandwidth and delay both vary
HEATMAPS = {f"{s}.{e}" for s in ("speedup_heatmap_single", "speedup_heatmap_baseline") for e in ("png", "svg", "pdf")}


def analytic_total(method: str, params: dict, n: int, tokens: int, codebook_path: str | None) -> int:
    """Bytes all ranks send per inference, from the methods' own formulas."""
    model = build_model("vit-tiny", seed=0)
    group = InProcessGroup(n)
    return sum(build_method(method, model, params, r, n, group.communicator(r), tokens=tokens,
                            codebook_path=codebook_path).analytic_bytes(tokens)["total"] for r in range(n))


def run_ok(tmp_path, monkeypatch, data: dict, *extra: str, plots: set[str] = PLOTS) -> tuple[pd.DataFrame, dict]:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert run_main([str(write(tmp_path / "e.yaml", data)), "--out", str(out), "--quiet", *extra]) == 0
    rows = read_rows(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["rows"] == len(rows) and manifest["failed_rows"] == 0
    assert {p.name for p in (out / "plots").iterdir()} == plots
    parquet = pd.read_parquet(out / "rows.parquet")  # every row, marked: none superseded in a single run
    assert list(parquet.columns) == [*COLUMNS, "superseded"] and len(parquet) == len(rows)
    assert not parquet["superseded"].any()
    assert list(rows.columns) == COLUMNS
    return rows, manifest


@pytest.mark.parametrize("backend", ["inprocess", "loopback"])
def test_every_method_profile_repetition_has_a_correct_row(backend, tmp_path, monkeypatch):
    data = tiny(backend=backend)
    rows, manifest = run_ok(tmp_path, monkeypatch, data)
    n_methods, reps = len(data["methods"]), data["repetitions"]
    assert len(rows) == n_methods * reps
    assert sorted(zip(rows["cell"], rows["repetition"])) == sorted(
        (f"p0/m{m}", r) for m in range(n_methods) for r in range(reps))
    assert (rows["status"] == "ok").all() and (rows["backend"] == backend).all()
    assert (rows["latency_s"] > 0).all() and (rows["compute_s"] > 0).all()
    # agreement with the single-device output computed in the runner process
    exact = rows[rows["method"].isin(EXACT)]
    assert (exact["agreement"] == 1.0).all() and (exact["max_abs_err"] < 1e-4).all()
    assert rows["agreement"].between(0, 1).all()
    # application bytes: the trace sums over ranks equal the methods' analytic totals
    codebook = manifest["codebooks"]["astra G=1 K=16"]
    for (method, params), g in rows.groupby(["method", "method_params"]):
        p = json.loads(params)
        want = analytic_total(method, p, 2, 17, codebook if method == "astra" else None)
        assert (g["bytes_sent"] == want).all(), (method, g["bytes_sent"].tolist(), want)
    assert (rows.loc[rows["method"] == "single", "comm_s"] == 0).all()
    # the row records the all-reduce that ran: on one host auto is direct; other methods have none
    assert set(rows.loc[rows["method"] == "tensor_parallel", "all_reduce"]) == {"direct"}
    assert set(rows.loc[rows["method"] != "tensor_parallel", "all_reduce"]) == {""}
    # per-rank traces, one record per row, replayable by the simulator
    traces = read_traces(tmp_path / "out")
    assert len(traces) == len(rows) and all(len(t["ranks"]) == 2 for t in traces)
    assert manifest["backend"]["name"] == backend and manifest["git"]["commit"]
    assert manifest["config"]["backend"] == backend and manifest["packages"]["torch"]
    if backend == "loopback":
        assert len(list((tmp_path / "out" / "node-logs").iterdir())) == 2
    # the host's speed before each unit: one probe per method, on every repetition of it
    assert (rows["host_probe_s"] > 0).all() and (rows.groupby("cell")["host_probe_s"].nunique() == 1).all()
    # and the same block inside the nodes: node processes of their own answer, in-process ranks have none
    if backend == "loopback":
        assert (rows["device_probe_s"] > 0).all() and (rows.groupby("cell")["device_probe_s"].nunique() == 1).all()
    else:
        assert rows["device_probe_s"].isna().all()


def test_sim_backend_fills_the_same_columns(tmp_path, monkeypatch):
    data = tiny(backend="sim", nodes={"count": 4}, methods=["single", "sequence_parallel"], repetitions=1,
                sweep={"bandwidth_mbps": [10, 100], "delay_ms": [0, 5]})
    rows, _ = run_ok(tmp_path, monkeypatch, data, plots=PLOTS | HEATMAPS)
    assert len(rows) == 2 * 4 and (rows["backend"] == "sim").all()
    sp = rows[rows["method"] == "sequence_parallel"].set_index(["bandwidth_mbps", "delay_ms"])["latency_s"]
    assert sp[(10.0, 0.0)] > sp[(100.0, 0.0)] and sp[(100.0, 5.0)] > sp[(100.0, 0.0)]
    assert rows["agreement"].isna().all() and rows["host_probe_s"].isna().all()  # nothing computed on this host
    assert rows["device_probe_s"].isna().all()
    assert (rows["mechanism"] == "sim/measured").all() and (rows["error"].fillna("") == "").all()
    assert (rows["latency_s"] >= rows["compute_s"]).all() and (rows["compute_s"] > 0).all()
    assert ((rows["topology"] == "star") & (rows["nodes"] == 4)).all()
    s = rows[rows["method"] == "sequence_parallel"]
    assert (s["comm_s"] > 0).all() and (s["bytes_on_wire"] > s["bytes_sent"]).all()
    assert (s["bytes_sent"] == analytic_total("sequence_parallel", {}, 4, 17, None)).all()
    assert not read_traces(tmp_path / "out")  # nothing ran: no schedule traces
    record = json.loads((tmp_path / "out" / "sim.json").read_text())
    assert {"wire", "tcp", "profiles"} <= set(record) and len(record["profiles"]) == 2


def test_auto_all_reduce_is_chosen_per_cell_by_the_links_delay(tmp_path, monkeypatch):
    data = tiny(methods=["tensor_parallel"], nodes={"count": 4}, input={"tokens": 1025, "seed": 0}, repetitions=1,
                warmup=0)  # 64 KiB chunks and more: not latency-bound
    shaped = {**data, "backend": "sim", "sweep": {"bandwidth_mbps": [100], "delay_ms": [0, 5]}}
    for d in ("sim", "inprocess"):
        (tmp_path / d).mkdir()
    rows, _ = run_ok(tmp_path / "sim", monkeypatch, shaped)
    assert dict(zip(rows["delay_ms"], rows["all_reduce"])) == {0.0: "ring", 5.0: "direct"}
    rows, _ = run_ok(tmp_path / "inprocess", monkeypatch, data)  # nothing shaped: no delay to go by
    assert set(rows["all_reduce"]) == {"direct"}
