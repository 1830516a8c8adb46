"""Node servers driven by the orchestrator over real gRPC on loopback (separate processes).

The reference is the in-process transport running the same JobSpec through RankRunner,
with one torch thread on both sides: the outputs must be equal bit for bit.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest
import torch

from testbed.node.records import NodeAddress
from testbed.backends.loopback import LoopbackBackend
from testbed.comm import InProcessGroup
from testbed.methods.job import JobSpec, RankRunner
from testbed.methods import METHODS
from testbed.node.orchestrator import NodeError, Orchestrator

TOKENS = 17  # 16 patches + CLS for vit-tiny; a 17-token prompt for gpt2-tiny


def reference(job: JobSpec) -> list:
    """Every rank's (output, trace bytes) in-process. Shards are built one after the other:
    building models in parallel threads races on torch's global RNG (new_model seeds it)."""
    group = InProcessGroup(job.world_size, timeout_s=60)
    runners = [RankRunner(job, r, group.communicator(r)) for r in range(job.world_size)]
    results = [None] * job.world_size

    def body(r):
        out, _ = runners[r].infer()
        results[r] = (out, runners[r].comm.trace.bytes_sent, runners[r].comm.trace.bytes_recv)

    threads = [threading.Thread(target=body, args=(r,)) for r in range(job.world_size)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    return results


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("model", ["vit-tiny", "gpt2-tiny"])
@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_over_grpc_equals_inprocess_bit_for_bit(loopback4, one_thread, method, n, model):
    job = JobSpec(model=model, method=method, world_size=n, tokens=TOKENS, seed=3, threads=1)
    ref = reference(job)
    with_output = [r for r, (out, _, _) in enumerate(ref) if out is not None]
    orch = Orchestrator(loopback4[:n], timeout_s=60)
    orch.load(job)
    got = orch.infer()
    assert [r for r, node in enumerate(got.nodes) if node.output is not None] == with_output
    assert torch.equal(got.output, ref[with_output[0]][0])
    for r, node in enumerate(got.nodes):  # the same messages crossed the wire
        assert (node.rank, node.bytes_sent, node.bytes_recv) == (r, ref[r][1], ref[r][2])
        assert node.trace.bytes_sent == node.bytes_sent and node.address == loopback4[r].control
        assert node.compute_s + node.comm_s <= node.wall_s + 1e-3
    assert got.latency_s >= max(node.wall_s for node in got.nodes)
    again = orch.infer()  # the shard is built once; inference can repeat
    assert torch.equal(again.output, got.output)


def test_stats_report_the_loaded_job(loopback4):
    orch = Orchestrator(loopback4[:2], timeout_s=30)
    orch.load(JobSpec(model="vit-tiny", method="sequence_parallel", world_size=2, tokens=TOKENS))
    orch.infer()
    stats = orch.stats()
    assert [s.rank for s in stats] == [0, 1]
    assert all(s.job_id == orch.job_id and s.inferences == 1 and s.pid > 0 for s in stats)
    assert [s.listen_addresses for s in stats] == [[a.control] for a in loopback4[:2]]


def test_every_node_times_the_probe_in_its_own_process_and_bad_runs_are_refused(loopback4):
    orch = Orchestrator(loopback4[:2], timeout_s=30)
    orch.load(JobSpec(model="vit-tiny", method="single", world_size=2, tokens=TOKENS))
    probes = orch.probe(runs=3)
    assert len(probes) == 2 and all(0 < p < 5 for p in probes)  # CPU seconds of one block (~10 ms here)
    with pytest.raises(NodeError, match="runs: got 0"):
        orch.probe(runs=0)
    assert orch.infer().output is not None  # a refused probe leaves the nodes running


def test_bad_job_is_rejected_by_name_and_leaves_the_nodes_running(loopback4):
    orch = Orchestrator(loopback4[:2], timeout_s=30)
    with pytest.raises(NodeError, match="method: got 'warp_drive'"):
        orch.load(JobSpec(model="vit-tiny", method="warp_drive", world_size=2, tokens=TOKENS))
    orch.load(JobSpec(model="vit-tiny", method="single", world_size=2, tokens=TOKENS))
    assert orch.infer().output is not None


def unused_address(host: str) -> str:
    with socket.socket() as s:
        s.bind((host, 0))
        return f"{host}:{s.getsockname()[1]}"  # nothing listens there once the socket closes


def test_node_given_an_unreachable_peer_fails_fast_naming_its_address(loopback4):
    bogus = unused_address("127.0.0.9")
    addresses = [loopback4[0], NodeAddress(control=loopback4[1].control, data=bogus)]
    orch = Orchestrator(addresses, timeout_s=60, connect_timeout_s=2.0)
    t0 = time.monotonic()
    with pytest.raises(NodeError) as info:
        orch.load(JobSpec(model="vit-tiny", method="sequence_parallel", world_size=2, tokens=TOKENS))
    assert time.monotonic() - t0 < 15  # connect deadline 2 s (+ the orchestrator's 1 s grace), never 60
    assert info.value.phase == "load" and bogus in str(info.value) and "cannot reach rank 1" in str(info.value)
    assert len(Orchestrator(loopback4, timeout_s=5).stats()) == 4  # the nodes are still up


def test_killed_node_mid_inference_fails_fast_and_stops_the_others():
    with LoopbackBackend() as backend:
        addresses = backend.start(3)
        procs = list(backend.procs)
        orch = Orchestrator(addresses, timeout_s=30)
        orch.load(JobSpec(model="vit-tiny", method="sequence_parallel", world_size=3, tokens=TOKENS))
        orch.infer()
        victim = procs[1]
        os.kill(victim.pid, signal.SIGSTOP)  # frozen: ranks 0 and 2 will block on its data
        caught = []
        worker = threading.Thread(target=lambda: caught.append(_raises(orch.infer)))
        worker.start()
        time.sleep(1.0)  # ranks 0 and 2 are now inside the inference, waiting for rank 1
        os.kill(victim.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        worker.join(40)
        assert not worker.is_alive()
        err = caught[0]
        assert isinstance(err, NodeError), err
        assert time.monotonic() - t_kill < 30  # within the deadline
        assert (err.rank, err.address, err.phase) == (1, addresses[1].control, "infer")
        assert "died" in str(err) or "unreachable" in str(err)
        # the orchestrator stopped the others: every node process exits by itself (before close())
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.1)
        assert [p.returncode for p in procs] == [0, -signal.SIGKILL, 0]
        assert not [p.pid for p in procs if os.path.exists(f"/proc/{p.pid}")]  # reaped: not in the table


def _raises(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return e
    return None


def test_hung_node_is_named_when_its_peers_give_up_on_it():
    """A frozen (not dead) node: its peers' waits end at their deadline and name it; so does the error."""
    with LoopbackBackend() as backend:
        addresses = backend.start(2)
        orch = Orchestrator(addresses, timeout_s=10)  # peers wait 0.5 x 10 = 5 s for a message
        orch.load(JobSpec(model="vit-tiny", method="sequence_parallel", world_size=2, tokens=TOKENS))
        os.kill(backend.procs[1].pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(NodeError) as info:
                orch.infer()
            assert time.monotonic() - t0 < 10  # within the deadline, the other node stopped
        finally:
            os.kill(backend.procs[1].pid, signal.SIGCONT)
        assert (info.value.rank, info.value.address) == (1, addresses[1].control)
        assert "nothing from rank 1" in str(info.value)  # rank 0's own report, kept as context
