"""GrpcCommunicator: the same collectives over real gRPC streams on loopback sockets.

Each rank runs in a thread of this process with its own PeerServer on its own
127.0.0.x address (port 0), so every message crosses a real TCP connection.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from testbed.comm import run_inprocess
from testbed.comm.grpc import GrpcCommunicator, PeerServer
from testbed.errors import CommError, ConfigError


def run_grpc(n, fn, timeout_s=30.0, chunk_bytes=None, job_id="job"):
    """Like run_inprocess, over gRPC: fn(rank, comm) per rank in threads; results in rank order."""
    servers = [PeerServer(f"127.0.0.{r + 1}:0") for r in range(n)]
    addresses = [s.address for s in servers]
    results, errors = [None] * n, [None] * n
    extra = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}

    def body(rank):
        comm = None
        try:
            comm = GrpcCommunicator(rank, addresses, servers[rank].hub, job_id, timeout_s=timeout_s, **extra)
            results[rank] = fn(rank, comm)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors[rank] = e
        finally:
            if comm is not None:
                comm.close()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(n)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout_s + 30)
            assert not t.is_alive(), "a rank hung past its deadline"
    finally:
        for s in servers:
            s.stop()
    for e in errors:
        if e is not None:
            raise e
    return results


def mixed_program(rank, comm):
    """Every collective, several dtypes, shapes that differ between ranks."""
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(37, 11, generator=g)
    out = {
        "gather": comm.all_gather(torch.randn(rank + 2, 5, generator=g)),
        "gather_int8": comm.all_gather(torch.randint(-128, 127, (300,), dtype=torch.int8, generator=g)),
        "gather_raw": comm.all_gather(torch.frombuffer(bytearray(b"rank%d" % rank), dtype=torch.uint8)),
        "reduce": comm.all_reduce(x),
        "reduce_f16": comm.all_reduce(x.half()),
        "reduce_direct": comm.all_reduce(x, "direct"),
        "reduce_direct_f16": comm.all_reduce(x.half(), "direct"),
        "bcast": comm.broadcast(x if rank == comm.world_size - 1 else None, src=comm.world_size - 1),
    }
    if rank == 0:
        comm.send(x * 2, dst=comm.world_size - 1)
    if rank == comm.world_size - 1:
        out["p2p"] = comm.recv(src=0)
    return out


def assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("n,chunk_bytes", [(2, None), (3, 256), (4, 1000)])
def test_collectives_equal_inprocess_bit_for_bit(n, chunk_bytes):
    # small chunk sizes cut every message into many frames without moving much data
    got = run_grpc(n, mixed_program, chunk_bytes=chunk_bytes)
    ref = run_inprocess(n, mixed_program)
    assert_same(got, ref)


def test_trace_counts_the_same_bytes_as_inprocess():
    def fn(rank, comm):
        comm.trace.start()
        comm.all_gather(torch.ones(1000))
        comm.all_reduce(torch.ones(1000))
        comm.trace.finish()
        return comm.trace.bytes_sent, comm.trace.bytes_recv, [e.kind for e in comm.trace.collectives()]

    assert run_grpc(3, fn) == run_inprocess(3, fn)


def test_all_gather_of_100_mb_completes_correctly():
    n_bytes = 100 * 1000 * 1000

    def fn(rank, comm):
        g = torch.Generator().manual_seed(rank)
        x = torch.randint(0, 255, (n_bytes,), dtype=torch.uint8, generator=g)
        out = comm.all_gather(x)
        expected = [torch.randint(0, 255, (n_bytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(r))
                    for r in range(comm.world_size)]
        return all(torch.equal(a, b) for a, b in zip(out, expected))

    assert run_grpc(2, fn, timeout_s=120) == [True, True]


def test_post_does_not_wait_for_the_receiver():
    posted = threading.Event()

    def fn(rank, comm):
        if rank == 0:
            for i in range(3):  # several messages, several chunks each, nobody receiving yet
                comm.send(torch.full((300_000,), float(i)), dst=1)
            posted.set()
            return None
        assert posted.wait(20), "send blocked until the receiver took the message"
        return [comm.recv(src=0)[0].item() for _ in range(3)]

    assert run_grpc(2, fn)[1] == [0.0, 1.0, 2.0]


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]  # closed on exit: nothing listens there


@pytest.mark.parametrize("bad_rank", [1, 0])  # a peer this rank dials, and one that dials it
def test_unreachable_peer_fails_fast_naming_its_address(bad_rank):
    with PeerServer("127.0.0.1:0") as server:
        me = 1 - bad_rank
        addresses = [None, None]
        addresses[me] = server.address
        addresses[bad_rank] = f"127.0.0.9:{free_port('127.0.0.9')}"
        t0 = time.monotonic()
        with pytest.raises(CommError) as info:
            GrpcCommunicator(me, addresses, server.hub, "job", timeout_s=60, connect_timeout_s=1.0)
        assert time.monotonic() - t0 < 10
    msg = str(info.value)
    assert addresses[bad_rank] in msg and f"rank {bad_rank}" in msg and "cannot reach" in msg


def test_peer_that_stops_breaks_waiting_takes_at_once():
    """Rank 1's server dies while rank 0 waits for it: rank 0 fails long before its deadline."""
    servers = [PeerServer(f"127.0.0.{r + 1}:0") for r in range(2)]
    addresses = [s.address for s in servers]
    comms = [None, None]

    def build(r):
        comms[r] = GrpcCommunicator(r, addresses, servers[r].hub, "job", timeout_s=60)

    builders = [threading.Thread(target=build, args=(r,)) for r in range(2)]
    [t.start() for t in builders]
    [t.join() for t in builders]
    threading.Timer(0.5, servers[1].stop).start()  # kills rank 1's end of the stream
    t0 = time.monotonic()
    try:
        with pytest.raises(CommError) as info:
            comms[0].recv(src=1)
        assert time.monotonic() - t0 < 10  # the deadline is 60 s
        assert addresses[1] in str(info.value) and "rank 1" in str(info.value)
        with pytest.raises(CommError):  # and every later call fails the same way
            comms[0].send(torch.ones(1), dst=1)
    finally:
        for c in comms:
            c.close()
        servers[0].stop()


def test_aborting_rank_makes_its_peers_fail_at_once():
    def fn(rank, comm):
        if rank == 2:
            time.sleep(0.3)
            comm.abort("rank 2 hit an error")
            return None
        with pytest.raises(CommError) as info:
            comm.all_reduce(torch.ones(10))
        return str(info.value)

    t0 = time.monotonic()
    msgs = run_grpc(3, fn, timeout_s=60)
    assert time.monotonic() - t0 < 20
    assert all("rank 2" in m or "lost" in m for m in msgs[:2])


def test_a_rank_that_finishes_and_closes_does_not_break_the_others():
    closed = threading.Event()

    def fn(rank, comm):
        if rank == 0:
            comm.close()
            closed.set()
            return None
        assert closed.wait(20)
        if rank == 2:
            comm.send(torch.arange(4), dst=1)
            return None
        got = comm.recv(src=2)  # rank 0's clean close must not fail this
        with pytest.raises(CommError, match="closed its stream"):
            comm.recv(src=0)
        return got

    assert torch.equal(run_grpc(3, fn)[1], torch.arange(4))


def test_ranks_running_different_programs_fail_out_of_step():
    def fn(rank, comm):
        if rank == 0:
            comm.all_gather(torch.ones(3))
        else:
            comm.broadcast(torch.ones(3), src=1)
        return None

    with pytest.raises(CommError, match="out of step"):
        run_grpc(2, fn, timeout_s=10)


def test_ranks_of_different_jobs_do_not_connect():
    servers = [PeerServer(f"127.0.0.{r + 1}:0") for r in range(2)]
    addresses = [s.address for s in servers]
    errors = []

    def build(rank, job_id):
        try:
            GrpcCommunicator(rank, addresses, servers[rank].hub, job_id, connect_timeout_s=1.0).close()
        except CommError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=build, args=(r, f"job-{r}")) for r in range(2)]
    try:
        [t.start() for t in threads]
        [t.join(20) for t in threads]
    finally:
        for s in servers:
            s.stop()
    assert len(errors) == 2 and all("no stream with rank" in e for e in errors)
    assert any("job-0" in e and addresses[1] in e for e in errors)


def test_bad_chunk_size_is_refused_by_name():
    with PeerServer() as server, pytest.raises(ConfigError) as info:
        GrpcCommunicator(0, [server.address, "127.0.0.1:1"], server.hub, "job", chunk_bytes=0)
    assert info.value.field == "chunk_bytes"
