"""Schedule trace: what one rank did during one inference, in program order.

The trace is the contract between the runtime and everything that reads timings:
results rows sum it up, and the SimPy simulator replays it. Events:

- ``Compute(duration_s)``: time between two communication calls (model math).
- ``Collective(kind, ops, ...)``: one Communicator call. ``ops`` lists the
  point-to-point messages it was made of, in program order, as
  ``("send", peer, nbytes)`` / ``("recv", peer, nbytes)``; a replay that
  honours this order reproduces the dependencies of ring algorithms.

Byte counts are payload bytes (tensor data, or the raw bytes a method packed);
transport framing is not counted here and shows up in bytes on the wire.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable


class CpuPacer:
    """Holds a compute segment to the wall time its CPU time takes at ``rate`` CPU-seconds per
    second: a device emulated by a CPU quota (rate = quota / period) whose quota refilled while it
    waited would otherwise run a short segment after a wait at host speed.

    ``mark()`` at the start of a segment, ``pace()`` at its end: sleeps until the wall time since
    the mark is at least the process's CPU time since then / ``rate`` (every thread of the
    process counts, as every thread draws on the quota). A segment already that slow (throttled
    by the quota, or slowed by anything else) is left as it is."""

    def __init__(self, rate: float, cpu_clock: Callable[[], float] = time.process_time,
                 wall_clock: Callable[[], float] = time.perf_counter, sleep: Callable[[float], None] = time.sleep):
        if not rate > 0:
            raise ValueError(f"rate must be > 0 CPU-seconds per second, got {rate!r}")
        self.rate, self.cpu_clock, self.wall_clock, self.sleep = rate, cpu_clock, wall_clock, sleep
        self._cpu0 = self._wall0 = None

    def mark(self) -> None:
        self._cpu0, self._wall0 = self.cpu_clock(), self.wall_clock()

    def pace(self) -> None:
        if self._cpu0 is None:
            return
        hold = (self.cpu_clock() - self._cpu0) / self.rate - (self.wall_clock() - self._wall0)
        if hold > 0:
            self.sleep(hold)


@dataclass
class Compute:
    duration_s: float
    type: str = "compute"
    #: CPU seconds of this host the computing thread spent in the segment, where ``duration_s`` is wall
    #: time (nodes, in-process ranks; None where not measured, as in calibration, whose durations are
    #: CPU time already). Not rescaled by time dilation: against a profile's CPU time it says how much
    #: more work the same segment cost the thread, apart from how long it was held or throttled.
    cpu_s: float | None = None


@dataclass
class Collective:
    kind: str  # all_gather | all_reduce | broadcast | send | recv
    ops: list[tuple[str, int, int]] = field(default_factory=list)  # (send|recv, peer rank, payload bytes)
    duration_s: float = 0.0  # wall time inside the call
    wait_s: float = 0.0  # time blocked waiting for peers' data
    serialize_s: float = 0.0  # time spent turning tensors into bytes and back
    type: str = "collective"

    @property
    def bytes_sent(self) -> int:
        return sum(n for op, _, n in self.ops if op == "send")

    @property
    def bytes_recv(self) -> int:
        return sum(n for op, _, n in self.ops if op == "recv")


@dataclass
class Trace:
    """Events of one rank for one inference. Start with ``start()``, close with ``finish()``."""

    rank: int
    events: list[Compute | Collective] = field(default_factory=list)
    _mark: float | None = None
    _cpu_mark: float = field(default=0.0, repr=False, compare=False)  # the thread's CPU time at the mark
    #: what compute segments are timed with: wall clock by default; the simulator's calibration
    #: times them in CPU seconds (time.process_time), which other load on the host does not stretch
    clock: Callable[[], float] = field(default=time.perf_counter, repr=False, compare=False)
    #: an emulated device's CpuPacer (testbed.node): every compute segment held to its device time
    pacer: CpuPacer | None = field(default=None, repr=False, compare=False)

    def _set_mark(self) -> None:
        self._mark = self.clock()
        self._cpu_mark = time.thread_time()
        if self.pacer is not None:
            self.pacer.mark()

    def start(self) -> None:
        self.events.clear()
        self._set_mark()

    def close_compute(self) -> float:
        """Record the compute segment since the last mark (paced first, if a pacer is set); return
        now (wall clock, for the collective)."""
        if self.pacer is not None and self._mark is not None:
            self.pacer.pace()
        now = self.clock()
        if self._mark is not None and now > self._mark:
            cpu = time.thread_time() - self._cpu_mark if self.clock is time.perf_counter else None
            self.events.append(Compute(now - self._mark, cpu_s=cpu))
        return time.perf_counter() if self.clock is not time.perf_counter else now

    def add(self, event: Collective) -> None:
        self.events.append(event)
        self._set_mark()

    def finish(self) -> None:
        self.close_compute()
        self._mark = None

    # -- summaries -------------------------------------------------------
    def _total(self, kind: type, attr: str):
        return sum(getattr(e, attr) for e in self.events if isinstance(e, kind))

    @property
    def compute_s(self) -> float:
        return self._total(Compute, "duration_s")

    @property
    def comm_s(self) -> float:
        return self._total(Collective, "duration_s")

    @property
    def wait_s(self) -> float:
        return self._total(Collective, "wait_s")

    @property
    def serialize_s(self) -> float:
        return self._total(Collective, "serialize_s")

    @property
    def bytes_sent(self) -> int:
        return self._total(Collective, "bytes_sent")

    @property
    def bytes_recv(self) -> int:
        return self._total(Collective, "bytes_recv")

    def collectives(self, kind: str | None = None) -> list[Collective]:
        return [e for e in self.events if isinstance(e, Collective) and (kind is None or e.kind == kind)]

    # -- (de)serialisation: plain JSON-able dicts, for results and the simulator --
    def to_dict(self) -> dict:
        events = [asdict(e) for e in self.events]
        for e in events:
            if e.get("type") == "compute" and e["cpu_s"] is None:
                del e["cpu_s"]  # not measured: traces and profiles stay as they were
        return {"rank": self.rank, "events": events}

    @classmethod
    def from_dict(cls, d: dict) -> "Trace":
        events: list[Compute | Collective] = []
        for e in d["events"]:
            if e["type"] == "compute":
                events.append(Compute(e["duration_s"], cpu_s=e.get("cpu_s")))
            else:
                ops = [(str(o), int(p), int(n)) for o, p, n in e["ops"]]
                events.append(Collective(e["kind"], ops, e["duration_s"], e["wait_s"], e.get("serialize_s", 0.0)))
        return cls(rank=d["rank"], events=events)
