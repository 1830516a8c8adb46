"""SIGINT and SIGTERM while `testbed run` builds the emulated network, starts its node servers or
waits for an inference over shaped links: the documented ending (see test_interrupts.py) and
nothing left on the machine."""

from __future__ import annotations

import json
import signal

import pytest

from testbed.net.cleanup import find_leftovers
from tests.experiment.helpers import write
from tests.experiment.test_interrupts import check_stopped, interrupt_at, start_run
from tests.net.test_teardown_root import machine_state

pytestmark = pytest.mark.root

EXP = {"name": "interrupts-mininet", "model": {"name": "vit-tiny"}, "input": {"tokens": 17, "seed": 0},
       "methods": ["single", "sequence_parallel"], "nodes": {"count": 4}, "topology": "star",
       "backend": "mininet", "repetitions": 50, "warmup": 0, "timeout_s": 60, "fidelity_s": 0,
       # 2 Mbit/s and 40 ms: each sequence-parallel inference waits on the links for 80 ms and more
       "sweep": {"profiles": [{"bandwidth_mbps": 2, "delay_ms": 40}]}, "emulation": {"time_dilation": 1}}


@pytest.mark.parametrize("marker, sig", [
    ("building the emulated network", signal.SIGINT),
    ("building the emulated network", signal.SIGTERM),
    ("starting 4 node servers", signal.SIGINT),
    ("starting 4 node servers", signal.SIGTERM),
    ("| sequence_parallel", signal.SIGINT),
], ids=["build-SIGINT", "build-SIGTERM", "nodes-SIGINT", "nodes-SIGTERM", "inference-SIGINT"])
def test_signal_in_each_emulation_phase_leaves_nothing(tmp_path, marker, sig):
    before = machine_state()
    out = tmp_path / "out"
    proc = start_run(write(tmp_path / "e.yaml", EXP), out)
    stdout, stderr = interrupt_at(proc, marker, sig)
    check_stopped(proc, sig, out, stdout, stderr)
    manifest = json.loads((out / "manifest.json").read_text())
    for run_id in manifest.get("backend", {}).get("emulation_runs", []):
        assert find_leftovers(run_id).empty(), find_leftovers(run_id).describe()
    after = machine_state()
    assert after == before
