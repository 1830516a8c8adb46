"""Measuring compute profiles on this host: one job's per-rank traces, without contention.

The host has 2 cores; N ranks run as threads of one process, and if they computed
at the same time each compute segment would be stretched by the others. So the
ranks run in-process (the real method, the real collectives, the same schedule
as every other backend) but take turns on the CPU: a rank holds the group's
``cpu`` lock while it runs and lets go of it only while it blocks waiting for a
message. Every compute segment (and every serialization) is therefore timed with
the CPU to itself, at ``job.threads`` torch threads, exactly as a device of its
own would run it. Compute segments are timed in CPU seconds of this process
(``CLOCK``): only the rank holding the turn runs, so that is the rank's own CPU
time, and other work on a shared host (which stretches wall-clock time, not CPU
time) does not inflate the profile. The ordering cost of taking turns lands in the collectives'
wait time, which the simulator does not use: it replays only compute and
serialization times, and models the waiting itself.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Callable, TypeVar

import torch

from testbed.comm.inprocess import InProcessCommunicator, InProcessGroup, run_inprocess, run_ranks
from testbed.comm.trace import Collective, Trace
from testbed.errors import check
from testbed.methods.job import JobSpec, RankRunner

T = TypeVar("T")

#: how compute segments of a profile are timed (recorded in its meta; profiles timed otherwise are stale)
CLOCK = "process_time"


class _TurnTakingGroup(InProcessGroup):
    def __init__(self, world_size: int, timeout_s: float):
        super().__init__(world_size, timeout_s)
        self.cpu = threading.Lock()  # held by the one rank that computes now

    def communicator(self, rank: int) -> "_TurnTakingCommunicator":
        return _TurnTakingCommunicator(self, rank)


class _TurnTakingCommunicator(InProcessCommunicator):
    group: _TurnTakingGroup

    def _take(self, src: int, tag: int) -> bytes:
        self.group.cpu.release()  # blocked: let another rank compute
        try:
            return super()._take(src, tag)
        finally:
            self.group.cpu.acquire()


def run_turn_taking(world_size: int, fn: Callable[[int, InProcessCommunicator], T], timeout_s: float = 600.0
                    ) -> list[T]:
    """``fn(rank, comm)`` per rank in its own thread, one rank on the CPU at a time; results in rank order.

    Like ``testbed.comm.run_inprocess``: the first real failure is re-raised after all threads stop.
    """
    group = _TurnTakingGroup(world_size, timeout_s)

    def body(rank: int, comm: InProcessCommunicator) -> T:
        with group.cpu:
            return fn(rank, comm)

    return run_inprocess(world_size, body, group=group)


def median_trace(reps: list[Trace]) -> Trace:
    """Event-wise median of repeated traces of one rank (the same program every time)."""
    first = reps[0]
    for tr in reps[1:]:
        same = len(tr.events) == len(first.events) and all(
            type(a) is type(b) and (not isinstance(a, Collective) or (a.kind, a.ops) == (b.kind, b.ops))
            for a, b in zip(tr.events, first.events))
        check(same, "repetitions", f"rank {first.rank} ran a different schedule in a repetition",
              "a method whose schedule does not change between inferences")
    out = Trace.from_dict(first.to_dict())
    for i, ev in enumerate(out.events):
        ev.duration_s = statistics.median(tr.events[i].duration_s for tr in reps)
        if isinstance(ev, Collective):
            ev.wait_s = statistics.median(tr.events[i].wait_s for tr in reps)  # type: ignore[union-attr]
            ev.serialize_s = statistics.median(tr.events[i].serialize_s for tr in reps)  # type: ignore[union-attr]
    return out


def measure(job: JobSpec, repetitions: int = 3, warmup: int = 1, timeout_s: float = 600.0) -> list[Trace]:
    """Per-rank traces of ``job`` on this host (event-wise medians over ``repetitions``), ranks taking turns.

    Durations are seconds of this host at ``job.threads`` torch threads.
    """
    check(isinstance(repetitions, int) and repetitions >= 1, "repetitions", repetitions, "an integer >= 1")
    check(isinstance(warmup, int) and warmup >= 0, "warmup", warmup, "an integer >= 0")

    from testbed.models import build_model

    # one copy of the weights for every rank (inference never writes them): a model this host can
    # hold once is measurable at any node count
    model = build_model(job.model, seed=job.seed, weights_path=job.weights_path, share_weights=True)

    def body(rank: int, comm: InProcessCommunicator) -> list[Trace]:
        comm.trace.clock = time.process_time  # CPU seconds: see CLOCK
        runner = RankRunner(job, rank, comm, model=model)
        reps = []
        for i in range(warmup + repetitions):
            runner.infer()
            if i >= warmup:
                reps.append(Trace.from_dict(comm.trace.to_dict()))
        return reps

    before = torch.get_num_threads()
    torch.set_num_threads(job.threads)  # process-wide; one rank computes at a time, so this is per rank
    try:
        per_rank = run_turn_taking(job.world_size, body, timeout_s)
    finally:
        torch.set_num_threads(before)
    return [median_trace(reps) for reps in per_rank]


def measure_transport(rounds: int = 200, bulk_bytes: int = 8 << 20, timeout_s: float = 60.0) -> dict:
    """The node runtime's gRPC transport on loopback (no shaping), two ranks in this process.

    ``per_message_s``: one-way time of a small message (half a ping-pong round trip):
    what a message costs beyond its link time in the stack, serialization, gRPC
    framing and threads. ``bulk_bytes_per_s``: payload rate of one large message, the
    stack's own ceiling when links are unshaped. Seconds and bytes/s of this host, the
    fastest of ``TRANSPORT_BATCHES`` batches (host load only adds time).
    """
    from testbed.comm.grpc import GrpcCommunicator, PeerServer

    check(isinstance(rounds, int) and rounds >= 1, "rounds", rounds, "an integer >= 1")
    servers = [PeerServer(f"127.0.0.{r + 1}:0") for r in range(2)]
    addresses = [s.address for s in servers]
    out: dict = {}

    def body(rank: int) -> None:
        comm = None
        try:
            comm = GrpcCommunicator(rank, addresses, servers[rank].hub, "calibrate-transport", timeout_s=timeout_s)
            _ping_pong(comm, rounds, bulk_bytes, out)
        finally:
            if comm is not None:
                comm.close()

    try:
        run_ranks(2, body, name="transport-rank")
    finally:
        for s in servers:
            s.stop()
    return {**out, "rounds": rounds, "bulk_bytes": bulk_bytes, "how": "gRPC peer streams on 127.0.0.1/2, 2 ranks "
            "as threads of one process"}


#: the transport is timed in this many batches and the fastest batch is kept: other load on a
#: shared host only ever adds time, so the minimum is the closest to the stack's own cost
TRANSPORT_BATCHES = 5


def _ping_pong(comm, rounds: int, bulk_bytes: int, out: dict) -> None:
    """Rank 0 times small round trips (``TRANSPORT_BATCHES`` batches, the fastest kept), then one bulk
    message (acknowledged) as many times (the fastest kept); rank 1 answers."""
    small, bulk = torch.zeros(2), torch.zeros(bulk_bytes // 4)
    peer = 1 - comm.rank
    for _ in range(10):  # warm the streams up
        if comm.rank == 0:
            comm.send(small, peer)
            comm.recv(peer)
        else:
            comm.recv(peer)
            comm.send(small, peer)
    per_batch = max(1, rounds // TRANSPORT_BATCHES)
    best, best_bulk = float("inf"), float("inf")
    for _ in range(TRANSPORT_BATCHES):
        t0 = time.perf_counter()
        for _ in range(per_batch):
            if comm.rank == 0:
                comm.send(small, peer)
                comm.recv(peer)
            else:
                comm.recv(peer)
                comm.send(small, peer)
        best = min(best, (time.perf_counter() - t0) / per_batch / 2)
    for _ in range(TRANSPORT_BATCHES):
        if comm.rank == 0:
            t0 = time.perf_counter()
            comm.send(bulk, peer)
            comm.recv(peer)  # the ack: the bulk message has fully arrived
            best_bulk = min(best_bulk, time.perf_counter() - t0 - best)
        else:
            comm.recv(peer)
            comm.send(small, peer)
    if comm.rank == 0:
        out["per_message_s"] = best
        out["bulk_bytes_per_s"] = bulk.nbytes / best_bulk
        out["batches"] = TRANSPORT_BATCHES
