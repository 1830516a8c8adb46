"""Dilation is transparent (root): the same tiny experiment under F=1 and F=2 gives the same
outputs, bytes and status, and under F=2 every recorded duration is the nodes' raw one / 2."""

from __future__ import annotations

import json
import time

import pytest

from testbed.experiment.cli import run_main
from testbed.experiment.store import read_rows, read_traces

from .helpers import write

pytestmark = pytest.mark.root

PAIR = {"name": "pair", "hosts": ["a", "b"], "links": [{"a": "a", "b": "b"}]}


def _experiment(factor: float | str) -> dict:
    return {"name": f"f{factor}", "model": {"name": "vit-tiny"}, "input": {"tokens": 17, "seed": 0},
            "methods": ["single", "tensor_parallel", "sequence_parallel",
                        {"name": "astra", "params": {"groups": 1, "codebook_size": 16}}],
            "nodes": {"count": 2}, "topology": PAIR, "backend": "mininet", "repetitions": 2, "warmup": 1,
            "timeout_s": 60, "fidelity_s": 0, "sweep": {"bandwidth_mbps": [50], "delay_ms": [2]},
            "emulation": {"time_dilation": factor}}


def test_same_outputs_bytes_and_status_under_f1_and_f2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rows, said = {}, {}
    for f in (1, 2):
        out = tmp_path / f"out{f}"
        assert run_main([str(write(tmp_path / f"e{f}.yaml", _experiment(f))), "--out", str(out), "--quiet",
                         "--no-plots"]) == 0
        said[f] = capsys.readouterr().out
        rows[f] = read_rows(out).sort_values(["cell", "repetition"]).reset_index(drop=True)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["time_dilation"]["factor"] == f and (rows[f]["time_dilation"] == f).all()
    a, b = rows[1], rows[2]
    assert (a["status"] == "ok").all() and (b["status"] == "ok").all()
    # the probe block timed inside the nodes (under their quotas at F=2), once per unit
    for r in (a, b):
        assert (r["device_probe_s"] > 0).all() and (r.groupby("cell")["device_probe_s"].nunique() == 1).all()
    # the summary says what throttling added where the devices were throttled
    assert "devices:  the probe block took" in said[2] and "devices:" not in said[1]
    for col in ("cell", "method", "repetition", "bytes_sent", "bytes_sent_max_rank", "agreement", "max_abs_err"):
        assert a[col].tolist() == b[col].tolist(), col
    # traces: the same messages in the same order, only the durations differ
    ta, tb = read_traces(tmp_path / "out1"), read_traces(tmp_path / "out2")
    ops = lambda t: [[[e.get("kind"), e.get("ops")] for e in r["events"] if e["type"] == "collective"]
                     for r in t["ranks"]]
    assert [ops(t) for t in ta] == [ops(t) for t in tb]


def test_recorded_durations_are_the_nodes_raw_ones_divided_by_the_factor():
    from testbed.backends.mininet import MininetBackend
    from testbed.methods.job import JobSpec
    from testbed.net.profile import LinkProfile
    from testbed.net.topology import topology_from_dict

    topo = topology_from_dict({**PAIR, "hosts": [{"name": "a", "device": {"threads": 1}},
                                                 {"name": "b", "device": {"threads": 1}}]})
    job = JobSpec(model="vit-tiny", method="sequence_parallel", world_size=2, tokens=17)
    with MininetBackend(topo, time_dilation=2) as backend:
        client = backend.client(backend.start(2), timeout_s=30)
        backend.apply_profile(LinkProfile(50, 2))
        try:
            assert client.orchestrator.timeout_s == 60  # deadlines in host time: x F
            client.load(job)
            client.infer()
            t0 = time.perf_counter()
            res = client.infer()
            wall = time.perf_counter() - t0
            raw = client.last_raw  # as the nodes and the orchestrator measured it
        finally:
            client.shutdown()
    assert raw is not None and raw.latency_s <= wall
    assert res.latency_s == pytest.approx(raw.latency_s / 2, rel=1e-12)
    for r, n in zip(raw.nodes, res.nodes):
        for k in ("wall_s", "compute_s", "comm_s", "wait_s", "serialize_s"):
            assert getattr(n, k) == pytest.approx(getattr(r, k) / 2, rel=1e-12), k
        assert n.bytes_sent == r.bytes_sent and n.bytes_recv == r.bytes_recv
        assert [e.duration_s for e in n.trace.events] == pytest.approx([e.duration_s / 2 for e in r.trace.events])
        assert n.trace.compute_s == pytest.approx(r.trace.compute_s / 2)
    assert (res.output == raw.output).all()
    # 2 ms one way, 2x dilated: each of the two ranks' all-gathers waits at least one 8 ms round trip raw
    assert raw.latency_s >= 0.008


def test_doctor_says_how_an_experiment_uses_the_cores(tmp_path, capsys):
    from testbed.cli import main

    exp = {**_experiment(1), "nodes": {"count": 2, "threads": 64}}  # 128 device cores: more than any CI host
    assert main(["doctor", str(write(tmp_path / "e.yaml", exp))]) == 0
    out = capsys.readouterr().out
    assert "time dilation 1x (fixed)" in out and "warning: 2 node(s) need 128 core(s)" in out
    assert main(["doctor", str(write(tmp_path / "a.yaml", _experiment("auto")))]) == 0
    out = capsys.readouterr().out
    assert "(auto)" in out and "warning" not in out
