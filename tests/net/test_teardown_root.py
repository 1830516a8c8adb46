"""Nothing outlives a run: SIGTERM mid-inference, Ctrl-C, and SIGKILL followed by `testbed clean`."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from testbed.net import cleanup
from testbed.net.cleanup import find_leftovers
from testbed.net.emulation import Emulation
from testbed.net.topology import load_topology

pytestmark = pytest.mark.root


def machine_state() -> dict:
    """What must be the same before and after a run: root iptables, named netns, bridges, ifbs."""
    def run(*argv):
        return subprocess.run(argv, capture_output=True, text=True).stdout

    links = run("ip", "-o", "link", "show")
    return {"iptables": [run("iptables-legacy", "-t", t, "-S") for t in ("filter", "nat", "mangle", "raw")],
            "netns": run("ip", "netns", "list"),
            "links": sorted(ln.split(":")[1].strip() for ln in links.splitlines() if cleanup.LINK_RE.match(
                ln.split(":")[1].strip().split("@")[0]))}


def own_links(run_id: str) -> list[str]:
    return [n for n in machine_state()["links"] if n.startswith(f"tb{run_id}")]


@pytest.mark.parametrize("mode, sig", [("infer", signal.SIGTERM), ("build", signal.SIGINT)])
def test_signal_mid_run_leaves_nothing(mode, sig, start_victim):
    before = machine_state()
    proc, run_id, _keeper = start_victim(mode)
    time.sleep(1.0)  # well inside an inference (2 Mbit/s, 40 ms) or the idle network
    during = find_leftovers(run_id)
    assert during.links and during.processes  # there was something to clean up
    proc.send_signal(sig)
    proc.wait(60)
    proc.stdout.close()
    proc.stderr.close()
    assert find_leftovers(run_id).empty(), find_leftovers(run_id).describe()
    after = machine_state()
    assert after["iptables"] == before["iptables"] and after["netns"] == before["netns"]
    assert not own_links(run_id)


def test_sigkill_leftovers_are_removed_by_clean_and_live_runs_are_spared(start_victim):
    proc, run_id, keeper = start_victim("build")
    with Emulation(load_topology("mesh")) as live:
        os.kill(keeper, signal.SIGKILL)  # its keeper first, else it would remove everything at once
        proc.kill()  # no chance to clean up: bridges and the registry stay behind
        proc.wait(30)
        proc.stdout.close()
        proc.stderr.close()
        deadline = time.monotonic() + 10
        while find_leftovers(run_id).processes and time.monotonic() < deadline:
            time.sleep(0.1)  # shells see their pty close, delay lines their parent die
        left = find_leftovers(run_id)
        assert left.links and not left.processes, left.describe()
        removed = cleanup.clean()  # `testbed clean`: every run whose owner is gone
        bridges = {n for n in left.links if "-eth" not in n}  # veths go away with their namespaces (async)
        assert bridges and set(removed.links) >= bridges
        assert find_leftovers(run_id).empty()
        assert not find_leftovers(live.run.run_id).empty()  # the live run was not touched
        out = live.node("h1").cmd(f"ping -n -c 1 -W 2 {live.data_ip('h2')}")
        assert " 0% packet loss" in out
