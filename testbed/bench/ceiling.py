"""Benchmark: what one link costs and carries, layer by layer, between two processes.

``python -m testbed.bench.collectives --ceiling [--sizes 1M,16M,64M]`` starts two worker
processes (rank 0 sends, rank 1 receives, on 127.0.0.1 and 127.0.0.2) and moves one message of
each size from 0 to 1 with four transports, alternating rep by rep so all see the same load:

- ``socket``: one TCP connection, ``sendall`` of the tensor's memory, ``recv_into`` a buffer the
  receiver reuses: what the kernel's loopback carries for Python, no copy above it;
- ``gloo``: torch.distributed's gloo ``send``/``recv`` into a preallocated tensor;
- ``grpc``: a bare Python gRPC stream of bytes messages of our frame size (``CHUNK_BYTES``), made
  before the clock starts and counted, not kept, on arrival: gRPC alone, nothing of ours;
- ``ours``: ``GrpcCommunicator.send``/``recv`` of the tensor (framing copy, gRPC, reassembly into a
  reused buffer, the tensor decoded from it).

A rep's time runs at the receiver from the end of a gloo barrier to the last byte received. Then
each transport plays ping-pong with a 1 KiB message (rank 0 times the round trips; bare gRPC's
partner is an echo handler on rank 1's gRPC server): what a small message costs. The table prints
the median round trip of each, the median GB/s of each and each against ``socket``: ``grpc`` over ``socket`` is the
ceiling the data plane's transport sets for every collective built on it; ``ours`` over ``grpc`` is
what the testbed adds on top of gRPC.
"""

from __future__ import annotations

import json
import queue
import socket
import statistics
import sys
import time
from datetime import timedelta
from typing import NamedTuple

IMPLS = ("socket", "gloo", "grpc", "ours")
SINK_SERVICE, SINK_METHOD, ECHO_METHOD = "testbed.bench.Sink", "Take", "Echo"
PING_BYTES = 1024  # the ping-pong's message, both ways
PING_ROUNDS = 200  # per transport, in blocks of PING_BLOCK alternating between transports
PING_BLOCK = 25


class Result(NamedTuple):
    times: dict[int, dict[str, list[float]]]  # size -> transport -> the receiver's seconds per rep
    rtt: dict[str, list[float]]  # transport -> seconds per ping-pong round trip (at rank 0)


def run(sizes: list[int], reps: int = 5, rounds: int = PING_ROUNDS) -> Result:
    """Two workers on loopback: per size and transport the receiver's seconds of each rep, and per
    transport the round-trip seconds of ``rounds`` small-message ping-pongs."""
    base = [sys.executable, "-m", "testbed.bench.ceiling", "--sizes", ",".join(map(str, sizes)), "--reps", str(reps),
            "--rounds", str(rounds)]
    from testbed.bench.collectives import local_launch, run_workers

    results = run_workers([lambda r=r: local_launch(r, base + ["--rank", str(r)]) for r in (0, 1)], lambda hello: hello)
    return Result({int(k): v for k, v in results[1]["times"].items()}, results[0]["rtt"])


def format_table(result: Result) -> str:
    from testbed.bench.collectives import _human

    times = result.times
    rtt = {i: statistics.median(result.rtt[i]) * 1e6 for i in IMPLS}
    lines = [f"round trip of {_human(PING_BYTES)} (us, median of {len(result.rtt['ours'])}): "
             + ", ".join(f"{i} {rtt[i]:.0f}" for i in IMPLS)
             + f"; ours/gloo {rtt['ours'] / rtt['gloo']:.2f}, grpc/gloo {rtt['grpc'] / rtt['gloo']:.2f}",
             f"{'size':>8}  " + "  ".join(f"{i + ' GB/s':>11}" for i in IMPLS)
             + "  grpc/socket  ours/grpc  ours/gloo"]
    for size, per in sorted(times.items()):
        rate = {i: size / statistics.median(per[i]) / 1e9 for i in IMPLS}
        lines.append(f"{_human(size):>8}  " + "  ".join(f"{rate[i]:>11.2f}" for i in IMPLS)
                     + f"  {rate['grpc'] / rate['socket']:>11.2f}  {rate['ours'] / rate['grpc']:>9.2f}"
                     f"  {rate['ours'] / rate['gloo']:>9.2f}")
    return "\n".join(lines)


# -- one worker ------------------------------------------------------------------------


def worker(rank: int, sizes: list[int], reps: int, rounds: int = PING_ROUNDS) -> None:
    from concurrent import futures

    import grpc
    import torch
    import torch.distributed as dist

    from testbed.comm.channels import CHUNK_BYTES, data_channel_options
    from testbed.comm.grpc import GrpcCommunicator, PeerServer

    torch.set_num_threads(1)
    host = f"127.0.0.{rank + 1}"
    peer_server = PeerServer(f"{host}:0")
    sink_done: queue.SimpleQueue = queue.SimpleQueue()
    sink_server = None
    listener = store = None
    if rank == 1:  # the receiver: a bare gRPC sink and a socket to accept
        expect: list[int] = [0]

        def take(requests, context):
            got = 0
            for msg in requests:
                got += len(msg)
                if got >= expect[0]:
                    sink_done.put(got)
                    got = 0
            return iter(())

        def echo(requests, context):
            yield from requests

        sink_server = grpc.server(futures.ThreadPoolExecutor(2), options=data_channel_options(CHUNK_BYTES))
        sink_server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            SINK_SERVICE, {SINK_METHOD: grpc.stream_stream_rpc_method_handler(take),
                           ECHO_METHOD: grpc.stream_stream_rpc_method_handler(echo)}),))
        sink_port = sink_server.add_insecure_port(f"{host}:0")
        sink_server.start()
        listener = socket.create_server((host, 0))
        hello = {"grpc": peer_server.address, "sink": f"{host}:{sink_port}", "sock": listener.getsockname()[1]}
    else:
        store = dist.TCPStore(host, 0, 2, is_master=True, wait_for_workers=False)
        hello = {"grpc": peer_server.address, "store": store.port}
    print(json.dumps(hello), flush=True)
    peers = json.loads(sys.stdin.readline())
    if store is None:
        store = dist.TCPStore("127.0.0.1", peers[0]["store"], 2, is_master=False)
    opts = dist.ProcessGroupGloo._Options()
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    opts._timeout = timedelta(seconds=300)
    gloo = dist.ProcessGroupGloo(store, rank, 2, opts)
    comm = GrpcCommunicator(rank, [peers[0]["grpc"], peers[1]["grpc"]], peer_server.hub, "ceiling", timeout_s=300)
    if rank == 0:
        sock = socket.create_connection(("127.0.0.2", peers[1]["sock"]))
        outq: queue.SimpleQueue = queue.SimpleQueue()
        channel = grpc.insecure_channel(peers[1]["sink"], options=data_channel_options(CHUNK_BYTES))
        call = channel.stream_stream(f"/{SINK_SERVICE}/{SINK_METHOD}")(iter(outq.get, None))
        echoq: queue.SimpleQueue = queue.SimpleQueue()
        echoes = channel.stream_stream(f"/{SINK_SERVICE}/{ECHO_METHOD}")(iter(echoq.get, None))
    else:
        sock, _ = listener.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    times: dict[str, dict[str, list[float]]] = {}
    for size in sizes:
        x = torch.full((size // 4,), 1.0)
        buf = torch.empty_like(x)
        view = memoryview(buf.numpy()).cast("B")
        frames = [bytes(min(CHUNK_BYTES, size - off)) for off in range(0, size, CHUNK_BYTES)]
        if rank == 1:
            expect[0] = size

        def send_socket():
            sock.sendall(memoryview(x.numpy()).cast("B"))

        def recv_socket():
            got = 0
            while got < size:
                n = sock.recv_into(view[got:])
                if n == 0:
                    raise RuntimeError("socket closed by the sender")
                got += n

        def send_grpc():
            for f in frames:
                outq.put(f)

        ops = {
            "socket": send_socket if rank == 0 else recv_socket,
            "gloo": (lambda: gloo.send([x], 1, 0).wait()) if rank == 0 else (lambda: gloo.recv([buf], 0, 0).wait()),
            "grpc": send_grpc if rank == 0 else (lambda: sink_done.get(timeout=300)),  # counted only
            "ours": (lambda: comm.send(x, 1)) if rank == 0 else (lambda: comm.recv(0)),
        }
        per = {i: [] for i in IMPLS}
        for rep in range(reps + 1):  # the first round warms every path up, is checked, and is not kept
            for impl in IMPLS:
                buf.zero_()
                gloo.barrier().wait()
                t0 = time.perf_counter()
                out = ops[impl]()
                if rep:
                    per[impl].append(time.perf_counter() - t0)
                elif rank == 1 and impl != "grpc" and not bool((out if impl == "ours" else buf).eq(1.0).all()):
                    raise RuntimeError(f"{impl}: the receiver got other bytes than were sent")
                if rank == 1 and impl == "ours":
                    comm.trace.start()  # keep the trace from growing
            if rank == 0:
                comm.trace.start()
        times[str(size)] = per
    rtt = _ping_pong(rank, rounds, sock, gloo, comm, None if rank else (echoq, echoes))
    gloo.barrier().wait()
    print(json.dumps({"rank": rank, "times": times, "rtt": rtt}), flush=True)
    if rank == 0:
        outq.put(None)
        echoq.put(None)
        call.cancel()
        echoes.cancel()
        channel.close()
    comm.close()
    sock.close()
    gloo.barrier().wait()
    peer_server.stop()
    if sink_server is not None:
        sink_server.stop(grace=None)


def _ping_pong(rank: int, rounds: int, sock, gloo, comm, echo) -> dict[str, list[float]]:
    """Rank 0 sends PING_BYTES, rank 1 sends them back, ``rounds`` times per transport in blocks
    that alternate between transports; rank 0's seconds per round trip. Bare gRPC's partner is the
    sink server's echo handler (rank 1's gRPC threads), so rank 1 only waits for that block."""
    import torch

    x, back = torch.ones(PING_BYTES // 4), torch.empty(PING_BYTES // 4)
    data, view = bytes(PING_BYTES), memoryview(back.numpy()).cast("B")

    def recv_socket():
        got = 0
        while got < PING_BYTES:
            got += sock.recv_into(view[got:])

    if rank == 0:
        echoq, echoes = echo
        ops = {"socket": lambda: (sock.sendall(data), recv_socket()),
               "gloo": lambda: (gloo.send([x], 1, 1).wait(), gloo.recv([back], 1, 1).wait()),
               "grpc": lambda: (echoq.put(data), next(echoes)),
               "ours": lambda: (comm.send(x, 1), comm.recv(1))}
    else:
        ops = {"socket": lambda: (recv_socket(), sock.sendall(data)),
               "gloo": lambda: (gloo.recv([back], 0, 1).wait(), gloo.send([x], 0, 1).wait()),
               "grpc": lambda: None,
               "ours": lambda: comm.send(comm.recv(0), 0)}
    rtt: dict[str, list[float]] = {i: [] for i in IMPLS}
    blocks = max(1, rounds // PING_BLOCK)
    for block in range(blocks + 1):  # the first block warms up and is not kept
        for impl in IMPLS:
            gloo.barrier().wait()
            n = PING_BLOCK if block else 5
            if rank == 1 and impl == "grpc":
                continue
            for _ in range(n):
                t0 = time.perf_counter()
                ops[impl]()
                if block:
                    rtt[impl].append(time.perf_counter() - t0)
        comm.trace.start()
    return rtt


def main(argv: list[str] | None = None) -> int:
    import argparse

    from testbed.bench.collectives import parse_sizes

    ap = argparse.ArgumentParser(prog="python -m testbed.bench.ceiling")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--sizes", required=True)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=PING_ROUNDS)
    a = ap.parse_args(argv)
    worker(a.rank, parse_sizes(a.sizes), a.reps, a.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
