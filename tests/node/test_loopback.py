"""LoopbackBackend: node processes on 127.0.0.x, refused shaping, nothing left after close()."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from testbed.backends.loopback import LoopbackBackend
from testbed.errors import ConfigError
from testbed.net.profile import LinkProfile
from testbed.node.orchestrator import Orchestrator


def test_starts_one_node_per_rank_on_its_own_address_and_close_leaves_nothing():
    backend = LoopbackBackend()
    addresses = backend.start(2)
    pids = backend.pids
    assert [a.control.rsplit(":", 1)[0] for a in addresses] == ["127.0.0.1", "127.0.0.2"]
    assert all(a.control == a.data for a in addresses)
    assert [s.pid for s in Orchestrator(addresses, timeout_s=10).stats()] == pids
    log_dir = backend.log_dir
    backend.close()
    backend.close()  # idempotent
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")]
    assert not log_dir.exists()


def test_only_the_unshaped_profile_is_accepted():
    backend = LoopbackBackend()
    backend.apply_profile(LinkProfile())
    for field, profile in [("bandwidth_mbps", LinkProfile(bandwidth_mbps=10)),
                           ("delay_ms", LinkProfile(delay_ms=5)),
                           ("loss_pct", LinkProfile(loss_pct=1))]:
        with pytest.raises(ConfigError, match="mininet") as info:
            backend.apply_profile(profile)
        assert info.value.field == field


def test_bad_node_count_is_refused():
    with pytest.raises(ConfigError) as info:
        LoopbackBackend().start(0)
    assert info.value.field == "n_nodes"


def test_a_node_that_cannot_start_is_reported_with_its_log(tmp_path):
    backend = LoopbackBackend(python="/bin/false", log_dir=str(tmp_path))
    with pytest.raises(Exception, match="exited with code 1"):
        backend.start(1)
    assert backend.procs == []


OWNER = """
import os, signal, sys
from testbed.backends.loopback import LoopbackBackend
b = LoopbackBackend(log_dir=sys.argv[2])  # a killed owner cannot remove a log directory of its own
b.start(2)
print(" ".join(map(str, b.pids)), flush=True)
if sys.argv[1] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit: the nodes must notice by themselves
"""


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_nodes_do_not_outlive_the_process_that_started_them(how, tmp_path):
    out = subprocess.run([sys.executable, "-c", OWNER, how, str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2, out.stderr
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.1)
    assert not [p for p in pids if _running(p)]


def _running(pid: int) -> bool:
    """In the process table and not a zombie (an orphan's zombie is reaped by init, not by us)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
