"""Scheduled faults on the Mininet backend (root): a link taken down for 2 s in the middle of a
method's repetitions costs the repetition it hits at least those 2 s, and no other repetition."""

from __future__ import annotations

import json

import pytest

from testbed.experiment.cli import run_main
from testbed.experiment.store import read_rows

from .helpers import tiny, write

pytestmark = pytest.mark.root


def test_link_down_costs_the_repetition_it_hits_and_only_that_one(tmp_path, monkeypatch):
    from testbed.net.cleanup import find_leftovers

    monkeypatch.chdir(tmp_path)
    down = {"kind": "link_down", "link": ["h2", "s1"], "at_s": 0.6, "duration_s": 2, "name": "cut"}
    data = tiny(backend="mininet", nodes={"count": 4}, methods=["tensor_parallel"], repetitions=40, warmup=1,
                fidelity_s=0, sweep={"bandwidth_mbps": [100], "delay_ms": [1]},
                emulation={"time_dilation": 1}, faults=[down])
    out = tmp_path / "out"
    assert run_main([str(write(tmp_path / "e.yaml", data)), "--out", str(out), "--quiet", "--no-plots"]) == 0
    rows = read_rows(out)
    assert len(rows) == 40 and (rows["status"] == "ok").all()
    assert rows["fault_time_s"].is_monotonic_increasing and rows["fault_time_s"].iloc[0] < 0.1
    base = rows["latency_s"].median()
    slow = rows.index[rows["latency_s"] >= base + 2.0]
    # the repetition in flight waits out the 2 s outage (TCP retransmits after it) ...
    assert len(slow) == 1, rows[["fault_time_s", "latency_s", "faults"]].to_string()
    # ... and no other is slowed by a second or more (a margin a correct run passes by far: a repetition
    # takes milliseconds)
    assert (rows["latency_s"].drop(slow) < base + 1.0).all(), rows["latency_s"].drop(slow).max()
    # the hosts' TCP counters saw it retransmit what the outage swallowed
    assert rows["retransmitted_segments"].notna().all() and rows.loc[slow[0], "retransmitted_segments"] >= 1
    hit = rows.index[rows["faults"] == "cut"]
    # rows name the faults active while they ran: the slow one, and the one before it when the link
    # went down in that one's last milliseconds
    assert slow[0] in hit and list(hit) in ([slow[0]], [slow[0] - 1, slow[0]]), list(hit)
    assert (rows["faults"].drop(hit) == "").all()
    assert rows["fault_time_s"].iloc[-1] > 0.6 + 2  # repetitions went on after the link came back
    manifest = json.loads((out / "manifest.json").read_text())
    [unit] = manifest["faults"]
    [event] = unit["events"]
    assert (event["name"], event["kind"], event["target"], event["at_s"]) == ("cut", "link_down", "h2-s1", 0.6)
    assert 0.6 <= event["fired_at_s"] < 0.6 + 0.5 and event["ended_at_s"] >= event["fired_at_s"] + 2
    assert "error" not in event
    if manifest["backend"]["mechanism"] == "htb+nfqueue":  # a star: every path held in its switch
        assert manifest["backend"]["delay_held"] == {"switch": 12}
    for run_id in manifest["backend"]["emulation_runs"]:
        left = find_leftovers(run_id)
        assert left.empty(), left.describe()


def test_host_to_host_link_comes_back_with_its_routes_and_profiles_return_each_unit(tmp_path, monkeypatch):
    """On the mesh (links between hosts) a link_down takes down a host's own interface: its routes must
    come back with it; a link_profile without a duration holds until the unit ends, then the cell's
    profile returns, so the next unit starts on the cell's links again."""
    monkeypatch.chdir(tmp_path)
    faults = [{"kind": "link_down", "link": ["h1", "h2"], "at_s": 0.2, "duration_s": 0.3, "name": "cut"},
              {"kind": "link_profile", "link": ["h3", "h4"], "at_s": 0.6, "profile": {"delay_ms": 30},
               "name": "slow"}]
    # 10 ms on every link: each repetition (two all-gathers over every pair) takes at least 20 ms, so
    # 50 repetitions outlast both faults on any machine
    data = tiny(backend="mininet", topology="mesh", nodes={"count": 4},
                methods=["sequence_parallel", "sequence_parallel_int8"], repetitions=50, warmup=1, fidelity_s=0,
                sweep={"profiles": [{"bandwidth_mbps": 100, "delay_ms": 10}]},
                emulation={"time_dilation": 1}, faults=faults)
    out = tmp_path / "out"
    assert run_main([str(write(tmp_path / "e.yaml", data)), "--out", str(out), "--quiet", "--no-plots"]) == 0
    rows = read_rows(out)
    assert len(rows) == 100 and (rows["status"] == "ok").all()  # h1-h2 carried traffic again after the cut
    manifest = json.loads((out / "manifest.json").read_text())
    assert [[e["name"] for e in u["events"]] for u in manifest["faults"]] == [["cut", "slow"]] * 2
    assert all("error" not in e and e["ended_at_s"] is not None for u in manifest["faults"] for e in u["events"])
    for _, unit in rows.groupby("cell"):
        assert unit["fault_time_s"].iloc[-1] > 0.6 + 0.3, unit["fault_time_s"].iloc[-1]
        before = unit[unit["faults"] == ""]
        slowed = unit[unit["faults"].str.contains("slow")]
        assert len(slowed) >= 2 and (slowed["fault_time_s"].iloc[1:] >= 0.6).all()
        # every exchange crosses h3-h4 in both methods: 20 ms more each way makes each repetition slower
        # by at least 2 x 20 ms; the unit's first repetitions ran on the cell's profile again
        assert slowed["latency_s"].iloc[1:].min() > before["latency_s"].median() + 0.02
