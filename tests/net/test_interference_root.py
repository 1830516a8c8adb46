"""bench.interference end to end in a live emulation (root): its three phases measured on a tiny
model, iperf3 flows stopped and nothing of the emulation left behind (its ratios are measurements;
none is asserted here)."""

from __future__ import annotations

import subprocess

import pytest

pytestmark = pytest.mark.root


def test_the_interference_benchmark_measures_every_phase_and_leaves_nothing():
    from testbed.bench.interference import PHASES, interference_table

    rows = interference_table(rounds=1, forwards=2, model="vit-tiny", tokens=17, log=lambda _msg: None)
    assert [r["phase"] for r in rows] == list(PHASES)
    assert all(r["cpu_per_forward_s"] > 0 and r["softirq_cpu_s_per_s"] >= 0 for r in rows)
    assert rows[0]["cpu_over_idle"] == pytest.approx(1.0)
    left = subprocess.run(["pgrep", "-f", "iperf3 -(s|c) .*530[0-9]|testbed.bench.forward_worker"],
                          capture_output=True, text=True).stdout.split()
    assert not left
