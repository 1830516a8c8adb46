"""LoopbackBackend: node processes on 127.0.0.x, refused shaping, nothing left after close()."""

from __future__ import annotations

import os

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
