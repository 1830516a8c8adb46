"""In-process transport: N ranks as threads, one FIFO queue per (src, dst) pair.

Used by tests and as the numerical reference for the networked backends.
If any rank fails, the group is aborted so that the others stop waiting.
"""

from __future__ import annotations

import queue
import signal
import threading
import time
from contextlib import contextmanager
from typing import Callable, TypeVar

from testbed.comm.base import Communicator, check_tag
from testbed.comm.serde import Encoded
from testbed.errors import CommError

T = TypeVar("T")


class InProcessGroup:
    def __init__(self, world_size: int, timeout_s: float = 120.0):
        self.world_size, self.timeout_s = world_size, timeout_s
        self.queues = {(s, d): queue.Queue() for s in range(world_size) for d in range(world_size) if s != d}
        self.aborted = threading.Event()

    def communicator(self, rank: int) -> "InProcessCommunicator":
        return InProcessCommunicator(self, rank)


class InProcessCommunicator(Communicator):
    def __init__(self, group: InProcessGroup, rank: int):
        super().__init__(rank, group.world_size, group.timeout_s)
        self.group = group

    def _post(self, dst: int, tag: int, data: Encoded) -> None:
        if self.group.aborted.is_set():  # stop at the next message, sent or awaited
            raise CommError(f"rank {self.rank}: group aborted while sending to rank {dst}")
        self.group.queues[(self.rank, dst)].put((tag, b"".join(data)))  # the one copy: the message is ours

    def _take(self, src: int, tag: int) -> bytes:
        q = self.group.queues[(src, self.rank)]
        deadline = time.monotonic() + self.timeout_s
        while True:
            if self.group.aborted.is_set():
                raise CommError(f"rank {self.rank}: group aborted while waiting for rank {src}")
            try:
                got, data = q.get(timeout=0.05)
                break
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise CommError(f"rank {self.rank}: nothing from rank {src} within {self.timeout_s:g} s") from None
        check_tag(self, src, tag, got)
        return data


@contextmanager
def signals_held():
    """Within the block, SIGINT, SIGTERM and SIGHUP are only noted; their handlers run after it.
    For code that must not be cut short by a handler that raises: teardown, and taking a lock (a
    raise between acquiring it and entering its with-block would leave it held for good). Python
    runs handlers in the main thread only, so only there is anything held (and a per-thread signal
    mask would not do: another thread of the process would take the signal)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    old = {s: signal.signal(s, lambda signum, _frame: noted.append(signum))
           for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for s in noted:
            if callable(old[s]):
                old[s](s, None)
            elif old[s] == signal.SIG_DFL:
                signal.raise_signal(s)


def run_ranks(world_size: int, fn: Callable[[int], T], abort: Callable[[], None] = lambda: None,
              name: str = "rank", stop_s: float = 120.0) -> list[T]:
    """Run ``fn(rank)`` for every rank in its own thread; return results in rank order.

    When a rank fails, ``abort()`` is called so the others stop waiting for it; after every
    thread stopped, the first real failure (lowest rank among those that did not merely see the
    group aborted) is re-raised. Interrupted while waiting (Ctrl-C, a signal's exception):
    ``abort()``, then the threads are joined (for at most ``stop_s`` seconds, through further
    interruptions) before the interruption propagates, so that no rank thread still runs in
    the interpreter when the caller tears down what the ranks use or the process exits.
    """
    results: list = [None] * world_size
    errors: list[BaseException | None] = [None] * world_size

    def body(rank: int) -> None:
        try:
            results[rank] = fn(rank)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors[rank] = e
            abort()

    threads = [threading.Thread(target=body, args=(r,), name=f"{name}{r}", daemon=True) for r in range(world_size)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except BaseException:
        with signals_held():  # a second signal must not raise inside abort()'s lock
            abort()
        join_within(threads, stop_s)
        raise
    # prefer a real failure over the "group aborted" errors it caused in other ranks
    real = [e for e in errors if e is not None and "group aborted" not in str(e)]
    first = real[0] if real else next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results


def join_within(threads: list[threading.Thread], seconds: float) -> bool:
    """Join ``threads`` for at most ``seconds`` in all; an exception raised meanwhile (a second
    signal) does not end the wait. True if they all ended."""
    deadline = time.monotonic() + seconds
    for t in threads:
        while t.is_alive() and time.monotonic() < deadline:
            try:
                t.join(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
            except BaseException:  # noqa: BLE001 - the first interruption is already on its way up
                pass
    return not any(t.is_alive() for t in threads)


def run_inprocess(world_size: int, fn: Callable[[int, Communicator], T], timeout_s: float = 120.0,
                  group: InProcessGroup | None = None) -> list[T]:
    """Run ``fn(rank, comm)`` for every rank in its own thread over one in-process group (run_ranks).

    ``group``: a prepared group (e.g. one whose communicators take turns on the CPU); by default a
    plain InProcessGroup(world_size, timeout_s).
    """
    group = group or InProcessGroup(world_size, timeout_s)
    return run_ranks(world_size, lambda rank: fn(rank, group.communicator(rank)), group.aborted.set,
                     stop_s=group.timeout_s)
