"""End to end in Mininet (root): a tiny sweep over two bandwidths on a 4-host star, every method,
rows with bytes on the wire from the interface counters, per-cell fidelity, plots, and nothing
of the emulation left afterwards."""

from __future__ import annotations

import json

import pytest

from testbed.experiment.cli import run_main
from testbed.experiment.store import read_rows, read_traces

from .helpers import ALL_METHODS, tiny, write

pytestmark = pytest.mark.root


def test_tiny_sweep_in_mininet(tmp_path, monkeypatch):
    from testbed.net.cleanup import find_leftovers

    monkeypatch.chdir(tmp_path)
    trace = {"name": "drop", "points": [[0, 50], [0.05, 5]], "delay_ms": 1, "loop": False}
    data = tiny(backend="mininet", nodes={"count": 4}, repetitions=2, warmup=1, fidelity_s=1,
                sweep={"bandwidth_mbps": [20, 200], "delay_ms": [1], "traces": [trace]})
    out = tmp_path / "out"
    assert run_main([str(write(tmp_path / "e.yaml", data)), "--out", str(out), "--quiet"]) == 0
    rows = read_rows(out)
    n_methods = len(ALL_METHODS)
    assert len(rows) == n_methods * 3 * 2  # two fixed profiles and one trace cell
    assert sorted(zip(rows["cell"], rows["repetition"])) == sorted(
        (f"p{p}/m{m}", r) for p in range(3) for m in range(n_methods) for r in range(2))
    assert (rows["status"] == "ok").all(), rows.loc[rows["status"] != "ok", "error"].tolist()
    assert (rows["delay_ms"] == 1.0).all()
    fixed, traced = rows[rows["trace"] == ""], rows[rows["trace"] == "drop"]
    assert set(fixed["bandwidth_mbps"]) == {20.0, 200.0} and fixed["trace_time_s"].isna().all()
    for _, g in traced.groupby("method"):  # each method replays the trace from its start
        assert g["trace_time_s"].iloc[0] < 0.05 and g["trace_time_s"].is_monotonic_increasing
        assert g["bandwidth_mbps"].iloc[0] == 50.0 and set(g["bandwidth_mbps"]) <= {50.0, 5.0}
    assert rows["mechanism"].isin(["htb+nfqueue", "htb+netem"]).all()
    exact = rows[rows["method"].isin(["single", "tensor_parallel", "sequence_parallel"])]
    assert (exact["agreement"] == 1.0).all()
    talk = rows[rows["method"] != "single"]
    # the interface counters see every payload byte plus gRPC/HTTP2/TCP/IP/Ethernet framing
    assert (talk["bytes_on_wire"] > talk["bytes_sent"]).all()
    # 1 ms one way on a 2-hop star path: every exchange costs real round trips
    assert (talk["comm_s"] > 0).all() and (rows["latency_s"] > 0).all()
    assert len(read_traces(out)) == len(rows)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["backend"]["name"] == "mininet"
    assert [f["profile"] for f in manifest["fidelity"]] == ["20 Mbit/s 1 ms", "200 Mbit/s 1 ms"]
    assert all(p["rtt_ms"] is not None for f in manifest["fidelity"] for p in f["paths"])
    assert {p.name for p in (out / "plots").iterdir()} >= {"latency.png", "speedup.svg", "breakdown.png", "trace.png"}
    for run_id in manifest["backend"]["emulation_runs"]:
        left = find_leftovers(run_id)
        assert left.empty(), left.describe()


def test_the_kernel_is_probed_once_per_run():
    """The spec check probes the kernel; the backend it prepares starts its emulation on that probe."""
    from testbed.backends import backend_class
    from testbed.experiment.checks import check_spec
    from testbed.experiment.session import backend_setup
    from testbed.experiment.spec import parse_spec
    from testbed.net.probe import Capabilities

    spec = parse_spec(tiny(backend="mininet", nodes={"count": 4}, methods=["single"]))
    prepared = check_spec(spec)
    assert isinstance(prepared.machine, Capabilities) and prepared.machine.mechanism in ("htb+nfqueue", "htb+netem")
    backend = backend_class("mininet").from_setup(backend_setup(spec, prepared.topology, machine=prepared.machine))
    try:
        backend.start(4)
        assert backend.emulation.capabilities is prepared.machine
        assert backend.mechanism == prepared.machine.mechanism
    finally:
        backend.close()
