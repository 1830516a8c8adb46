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

Several jobs measured together (``measure_interleaved``) take turns by inference, round-robin:
a slow phase of a shared host (seconds to minutes) then slows one repetition of many jobs rather
than every repetition of one, and each job's event-wise median over its repetitions discards it.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from testbed.comm.inprocess import InProcessCommunicator, InProcessGroup, run_ranks
from testbed.comm.trace import Collective, Trace
from testbed.errors import check
from testbed.methods.job import JobSpec, RankRunner

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
    return measure_interleaved([job], repetitions, warmup, timeout_s)[0].traces


@dataclass
class Measured:
    """One job's calibration: per-rank event-wise median traces, and the host probe
    (``testbed.models.probe.host_probe_s``) taken right before each of its timed inferences."""

    traces: list[Trace]
    probes_s: list[float] = field(default_factory=list)


class _Rounds:
    """Whose inference runs now: slot k of the schedule is inference ``k // jobs`` of job ``k % jobs``
    (round-robin); a slot ends when every rank of its job has finished that inference."""

    def __init__(self, sizes: list[int], inferences: int, timeout_s: float,
                 on_slot: Callable[[int, int], None]):
        self.sizes, self.inferences, self.timeout_s, self.on_slot = sizes, inferences, timeout_s, on_slot
        self.slot, self.done = 0, 0
        self.cond = threading.Condition()
        self.aborted = False

    def current(self) -> tuple[int, int]:
        return divmod(self.slot, len(self.sizes))

    def start(self) -> None:
        with self.cond:
            self.on_slot(*self.current())

    def wait(self, inference: int, job: int) -> None:
        deadline = time.monotonic() + self.timeout_s
        with self.cond:
            while not self.aborted and self.current() != (inference, job):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"calibration: inference {inference} of job {job} did not get its turn "
                                       f"within {self.timeout_s:g} s")
                self.cond.wait(left)
            if self.aborted:
                raise RuntimeError("calibration group aborted")

    def finish(self, job: int) -> None:
        with self.cond:
            self.done += 1
            if self.done == self.sizes[job]:
                self.done, self.slot = 0, self.slot + 1
                if self.slot < self.inferences * len(self.sizes):
                    self.on_slot(*self.current())  # nothing computes now: every rank waits for its turn
                self.cond.notify_all()

    def abort(self) -> None:
        with self.cond:
            self.aborted = True
            self.cond.notify_all()


def measure_interleaved(jobs: list[JobSpec], repetitions: int = 3, warmup: int = 1, timeout_s: float = 600.0,
                        probe: Callable[[], float] | None = None,
                        log: Callable[[str], None] | None = None) -> list[Measured]:
    """``measure`` for several jobs at once, their inferences interleaved round-robin: inference i of
    every job runs before inference i + 1 of any, one job at a time, its ranks taking turns.

    A shared host has slower and faster phases lasting seconds to minutes; measured one after the
    other, one job's every repetition can fall into a slow phase that the next job's escape, which
    biases the methods against each other. Interleaved, each job's repetitions are spread over the
    whole calibration, and the event-wise median picks its typical phase. Every job's ranks are
    built before the first inference (setup is never timed beside an inference); ``probe`` (e.g.
    ``host_probe_s``), if given, runs right before each timed inference with nothing else computing.
    Jobs must share a torch thread count (set process-wide). Every job's ranks are held in memory
    until the last inference (the weights once per model; a rank's own shards and state apart).
    ``log``, if given, hears when each round of inferences starts (progress of a long calibration).
    """
    check(isinstance(repetitions, int) and repetitions >= 1, "repetitions", repetitions, "an integer >= 1")
    check(isinstance(warmup, int) and warmup >= 0, "warmup", warmup, "an integer >= 0")
    check(len(jobs) >= 1, "jobs", len(jobs), "at least one job")
    threads = {job.threads for job in jobs}
    check(len(threads) == 1, "threads", sorted(threads), "one torch thread count for every job measured together")

    from testbed.models import build_model

    # one copy of the weights per model for every rank of every job (inference never writes them): a model
    # this host can hold once is measurable at any node count
    models: dict[tuple, object] = {}
    for job in jobs:
        mk = (job.model, job.seed, job.weights_path)
        if mk not in models:
            models[mk] = build_model(job.model, seed=job.seed, weights_path=job.weights_path, share_weights=True)
    groups = [_TurnTakingGroup(job.world_size, timeout_s) for job in jobs]
    flat = [(j, r) for j, job in enumerate(jobs) for r in range(job.world_size)]
    probes: list[list[float]] = [[] for _ in jobs]

    t0 = time.perf_counter()

    def on_slot(inference: int, j: int) -> None:
        if log is not None and j == 0:
            what = "warm-up" if inference < warmup else f"repetition {inference - warmup + 1}/{repetitions}"
            log(f"{what} of {len(jobs)} profile(s), round-robin ({time.perf_counter() - t0:.0f} s)")
        if probe is not None and inference >= warmup:
            probes[j].append(probe())

    rounds = _Rounds([job.world_size for job in jobs], warmup + repetitions, timeout_s, on_slot)
    ready = threading.Barrier(len(flat), timeout=timeout_s)

    def released(group: _TurnTakingGroup, wait: Callable[[], object]) -> None:
        group.cpu.release()  # blocked: let another rank compute (or build)
        try:
            wait()
        finally:
            group.cpu.acquire()

    def body(i: int) -> list[Trace]:
        j, rank = flat[i]
        job, group = jobs[j], groups[j]
        comm = group.communicator(rank)
        comm.trace.clock = time.process_time  # CPU seconds: see CLOCK
        with group.cpu:
            runner = RankRunner(job, rank, comm, model=models[(job.model, job.seed, job.weights_path)])
            try:
                released(group, ready.wait)
            except threading.BrokenBarrierError:
                raise (RuntimeError("calibration group aborted") if rounds.aborted else
                       TimeoutError(f"calibration: not every job's ranks were built within {timeout_s:g} s")) from None
            reps = []
            for inference in range(warmup + repetitions):
                released(group, lambda: rounds.wait(inference, j))
                runner.infer()
                if inference >= warmup:
                    reps.append(Trace.from_dict(comm.trace.to_dict()))
                rounds.finish(j)
            return reps

    def abort() -> None:
        for g in groups:
            g.aborted.set()
        rounds.abort()
        ready.abort()

    before = torch.get_num_threads()
    torch.set_num_threads(threads.pop())  # process-wide; one rank computes at a time, so this is per rank
    if log is not None:
        log(f"building the ranks of {len(jobs)} profile(s)")
    try:
        rounds.start()
        per_rank = run_ranks(len(flat), body, abort, name="calibrate", stop_s=timeout_s)
    finally:
        torch.set_num_threads(before)
    out, i = [], 0
    for j, job in enumerate(jobs):
        out.append(Measured([median_trace(reps) for reps in per_rank[i:i + job.world_size]], probes[j]))
        i += job.world_size
    return out


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
