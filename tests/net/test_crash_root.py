"""Crashes heal: a runner killed with SIGKILL leaves no process running a second later (its keeper
kills them and removes the links), and what a run whose keeper died with it left is removed by the
next Emulation before it builds anything, in one line on stderr."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from testbed.net.cleanup import find_leftovers
from testbed.net.emulation import Emulation
from testbed.net.profile import LinkProfile
from testbed.net.topology import load_topology

pytestmark = pytest.mark.root

# what a run of the Mininet backend starts, by a piece of its command line
KINDS = {"node server": "testbed.node", "delay line": "testbed.net.delayline", "iperf3": "iperf3 -s",
         "tc batch": "tc -force -batch", "Mininet shell": "mininet:tb"}


def start_time(pid: int) -> str | None:
    """The process's kernel start time while it runs (not a zombie), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def wait_gone(pid: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while start_time(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.02)


def test_sigkill_of_the_runner_leaves_no_process_after_1s(start_victim):
    # built from a worker thread that has exited since: what it started must live on until the kill
    proc, run_id, keeper = start_victim("crash")
    before = [(pid, cmd, start_time(pid)) for pid, cmd in find_leftovers(run_id).processes]
    missing = [kind for kind, part in KINDS.items() if not any(part in cmd for _pid, cmd, _t in before)]
    assert not missing, f"the run had no {missing}: {[cmd for _p, cmd, _t in before]}"
    t0 = time.monotonic()
    proc.kill()
    proc.wait(10)
    time.sleep(max(0.0, t0 + 1.0 - time.monotonic()))
    alive = [cmd for pid, cmd, t in before if t is not None and start_time(pid) == t]
    assert not alive, f"alive 1 s after the runner's SIGKILL: {alive}"
    assert not find_leftovers(run_id).processes
    err = proc.stderr.read()  # until the keeper, which shares the runner's stderr, has exited
    assert f"the owner of emulation run {run_id} died; removed" in err, err[-2000:]
    assert find_leftovers(run_id).empty(), find_leftovers(run_id).describe()
    assert start_time(keeper) is None


def test_next_emulation_removes_what_a_dead_run_left_and_says_so(start_victim, capfd):
    proc, run_id, keeper = start_victim("build")
    os.kill(keeper, signal.SIGKILL)  # runner and keeper both gone: nobody cleaned up
    wait_gone(keeper)
    proc.kill()
    proc.wait(10)
    left = find_leftovers(run_id)
    bridges = {n for n in left.links if "-eth" not in n}
    assert bridges and left.registries, left.describe()
    capfd.readouterr()
    with Emulation(load_topology("line")) as em:
        err = capfd.readouterr().err
        assert find_leftovers(run_id).empty(), find_leftovers(run_id).describe()
        assert bridges <= set(em.swept.links)
        said = [line for line in err.splitlines() if "removed what dead emulation runs left" in line]
        assert len(said) == 1 and all(b in said[0] for b in bridges), err
        out = em.node("h1").cmd(f"ping -n -c 1 -W 2 {em.data_ip('h3')}")
        assert " 0% packet loss" in out, out


def test_processes_started_from_a_worker_thread_outlive_the_thread():
    box: list[Emulation] = []
    worker = threading.Thread(target=lambda: box.append(Emulation(load_topology("star")).start()))
    worker.start()
    worker.join()
    assert box, "the emulation did not start"
    em = box[0]
    try:
        time.sleep(0.5)
        assert [p.args for p in em.procs if p.poll() is not None] == []
        for line in em.delay_lines.values():
            assert isinstance(line.stats(), dict)
        em.apply_profile(LinkProfile(bandwidth_mbps=10, delay_ms=5))  # the tc batches still answer
    finally:
        em.close()
    assert find_leftovers(em.run.run_id).empty()
