"""The Mininet backend runs every method across shaped links and gets the in-process outputs.

Four node servers, one per host of the star, talk gRPC over the emulated links (data addresses)
and are driven over the unshaped control network; the reference is the same JobSpec run by
RankRunner with the in-process transport.
"""

from __future__ import annotations

import threading

import pytest
import torch

from testbed.node.records import NodeAddress
from testbed.comm import InProcessGroup
from testbed.methods.job import JobSpec, RankRunner
from testbed.methods import METHODS
from testbed.net.probe import probe
from testbed.net.profile import LinkProfile

pytestmark = pytest.mark.root
TOKENS = 17


def reference_output(job: JobSpec) -> torch.Tensor:
    group = InProcessGroup(job.world_size, timeout_s=60)
    runners = [RankRunner(job, r, group.communicator(r)) for r in range(job.world_size)]  # built one by one
    outs: list = [None] * job.world_size
    threads = [threading.Thread(target=lambda r=r: outs.__setitem__(r, runners[r].infer()[0]))
               for r in range(job.world_size)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    return next(o for o in outs if o is not None)


@pytest.fixture(scope="module")
def star():
    from testbed.backends.mininet import MininetBackend

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the nodes run with one thread too: bit-identical arithmetic
    with MininetBackend("star") as backend:
        addresses = backend.start(4)
        backend.apply_profile(LinkProfile(bandwidth_mbps=50, delay_ms=2))
        yield backend, addresses
    torch.set_num_threads(before)


def test_nodes_serve_data_on_emulated_and_control_on_unshaped_addresses(star):
    backend, addresses = star
    em = backend.emulation
    assert backend.mechanism == em.mechanism == probe(full=False).mechanism
    for host, addr in zip(em.topology.host_names, addresses):
        assert isinstance(addr, NodeAddress)
        assert addr.data.startswith(em.data_ip(host) + ":") and addr.control.startswith(em.control_ip(host) + ":")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_over_emulated_links_equals_inprocess(star, method):
    from testbed.node.orchestrator import Orchestrator

    backend, addresses = star
    job = JobSpec(model="vit-tiny", method=method, world_size=4, tokens=TOKENS, seed=3, threads=1)
    orch = Orchestrator(addresses, timeout_s=120)
    orch.load(job)
    wire0 = backend.wire_bytes()
    got = orch.infer()
    wire = backend.wire_bytes() - wire0
    assert torch.equal(got.output, reference_output(job))
    assert wire >= got.bytes_sent  # payload crossed the emulated links (plus gRPC/TCP/IP framing)
    # one-way delay 2 ms between any two hosts: any method that exchanges messages takes longer
    if got.bytes_sent:
        assert got.latency_s > 0.002


def test_trace_replay_and_fidelity_table_on_the_running_backend(star):
    import time

    from testbed.net.replay import BandwidthTrace

    backend, _ = star
    replay = backend.replay(BandwidthTrace.from_points([(0, 20), (0.2, 40)]), LinkProfile(delay_ms=2), loop=False)
    deadline = time.monotonic() + 10
    while len(replay.log) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    backend.stop_replays()
    assert [bw for _, bw, _ in replay.log] == [20, 40]
    assert all(lk.a_to_b.bandwidth_mbps == 40 for lk in backend.emulation.topology.links)
    rows = backend.fidelity_table(seconds=1)
    assert len(rows) == 1 and rows[0]["bandwidth_mbps"] == 40  # every star pair has the same path
    assert 0.85 <= rows[0]["goodput_ratio"] <= 1.0 and abs(rows[0]["rtt_error_ms"]) < 1.5
    backend.apply_profile(LinkProfile(bandwidth_mbps=50, delay_ms=2))  # as the other tests expect
