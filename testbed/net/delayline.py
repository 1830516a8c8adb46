"""Delay line: holds each path's packets for that path's one-way delay (+ jitter).

Used where the kernel has no sch_netem. iptables sends each path's packets to its own NFQUEUE
queue, so each queue is one path and keeps its own delay. One daemon runs in the root namespace
per run for the paths that cross a switch (matched where the bridge forwards them to the
receiver, testbed.net.tc.switch_rules), and one inside each host that receives over a direct
link (matched on INPUT by source, testbed.net.tc.receiver_rules). Never on the sender: holding
packets there keeps them charged to the sending socket (TCP small queues) and collapses TCP
throughput (measured: 2.3 vs 93.6 Mbit/s at 20 ms).

Jitter never reorders a path: release = max(previous release on that queue, arrival + delay +
U(-jitter, +jitter)), as a real link would. Jitter samples are uniform like netem's default.

Control protocol (one JSON object per line on stdin; one reply line on stdout, flushed):
  {"seq": 3, "queues": {"0": {"delay_ms": 10, "jitter_ms": 1}, ...}}  -> "ok 3"
      sets the listed queues (binding new ones); later packets use the new values at once,
      packets already held keep their release time (so a change never reorders a path).
  {"seq": 4, "stats": true}  -> "stats 4 {"0": packets, ...}"
The daemon prints "ready" once started, and exits, releasing everything it holds, on end of
stdin (its owner is gone) or SIGTERM.

Run as ``python -m testbed.net.delayline [--seed N]`` in the namespace whose queues it serves.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections import deque

# SCHED_FIFO priority the owners give a delay line: it must release packets on time on a busy machine
DELAYLINE_RT_PRIORITY = 10


class PathDelay:
    """Release times for one path (one NFQUEUE queue). Times are seconds on one monotonic clock."""

    def __init__(self, delay_ms: float = 0.0, jitter_ms: float = 0.0, rng: random.Random | None = None):
        self.rng = rng or random.Random(0)
        self.last_release_s = float("-inf")
        self.set(delay_ms, jitter_ms)

    def set(self, delay_ms: float, jitter_ms: float) -> None:
        if not (delay_ms >= 0 and 0 <= jitter_ms <= delay_ms):
            raise ValueError(f"delay_ms={delay_ms!r}, jitter_ms={jitter_ms!r}: need delay_ms >= 0 and 0 <= jitter_ms <= delay_ms")
        self.delay_s, self.jitter_s = delay_ms / 1e3, jitter_ms / 1e3

    def release_time(self, arrival_s: float) -> float:
        """When a packet arriving at ``arrival_s`` leaves: never before the previous one (no reordering)."""
        hold = self.delay_s
        if self.jitter_s:
            hold = max(0.0, hold + self.rng.uniform(-self.jitter_s, self.jitter_s))
        self.last_release_s = max(self.last_release_s, arrival_s + hold)
        return self.last_release_s


class DelayLine:
    """The daemon's event loop: NFQUEUE notifications in, batch verdicts out at release time."""

    def __init__(self, seed: int = 0):
        from testbed.net.nfqueue import NfQueueSocket, enable_rx_timestamps

        self.nfq = NfQueueSocket()
        self._ts_sock = enable_rx_timestamps()
        _precise_timers()
        self.rng = random.Random(seed)
        self.paths: dict[int, PathDelay] = {}
        self.held: dict[int, deque] = {}  # queue -> deque of (release_s, packet_id)
        self.counts: dict[int, int] = {}
        self.last_id: dict[int, int] = {}
        self._stdin_buf = b""
        self.running = True

    def configure(self, queues: dict) -> None:
        for key, cfg in queues.items():
            q = int(key)
            if q not in self.paths:
                self.paths[q] = PathDelay(rng=self.rng)
                self.held[q], self.counts[q] = deque(), 0
                self.nfq.bind(q)
            self.paths[q].set(float(cfg.get("delay_ms", 0.0)), float(cfg.get("jitter_ms", 0.0)))

    def _handle_line(self, line: bytes) -> None:
        msg = json.loads(line)
        seq = msg.get("seq", 0)
        if msg.get("stats"):
            _reply(f"stats {seq} {json.dumps({str(q): n for q, n in self.counts.items()})}")
            return
        self.configure(msg.get("queues", {}))
        _reply(f"ok {seq}")

    def _read_stdin(self) -> None:
        chunk = os.read(0, 65536)
        if not chunk:  # owner gone
            self.running = False
            return
        self._stdin_buf += chunk
        while b"\n" in self._stdin_buf:
            line, self._stdin_buf = self._stdin_buf.split(b"\n", 1)
            if line.strip():
                try:
                    self._handle_line(line)
                except (ValueError, KeyError, OSError) as e:
                    _reply(f"error {e}")

    def _take_packets(self) -> None:
        now, wall = time.monotonic(), time.time()
        for q, pid, arrival_wall in self.nfq.packets():
            path = self.paths.get(q)
            if path is None:  # a queue we did not bind cannot reach us; ignore defensively
                continue
            # hold from the kernel's arrival time: our own wake-up latency is not part of the delay
            arrival = now if arrival_wall is None else now - min(max(wall - arrival_wall, 0.0), 1.0)
            self.held[q].append((path.release_time(arrival), pid))
            self.counts[q] += 1

    def _release_due(self) -> float | None:
        """Accept packets whose time has come; return seconds until the next release (None: nothing held)."""
        now = time.monotonic()
        wait = None
        for q, held in self.held.items():
            last = None
            while held and held[0][0] <= now:
                last = held.popleft()[1]
            if last is not None:
                self.nfq.accept_upto(q, last)
                self.last_id[q] = last
            if held:
                dt = held[0][0] - now
                wait = dt if wait is None else min(wait, dt)
        return wait

    def run(self) -> None:
        """Serve until stdin ends or a _Stop signal arrives; then release everything still held."""
        _reply("ready")
        try:
            while self.running:
                wait = self._release_due()
                readable, _, _ = select.select([self.nfq, 0], [], [], wait)
                if self.nfq in readable:
                    self._take_packets()
                if 0 in readable:
                    self._read_stdin()
        except _Stop:
            pass
        finally:
            self.release_all()

    def release_all(self) -> None:
        for q, held in self.held.items():
            if held:
                self.nfq.accept_upto(q, held[-1][1])
                held.clear()
        self.nfq.close()


class DelayLineClient:
    """The owner's handle on one delay-line daemon (started with ``Emulation.popen``)."""

    def __init__(self, proc: subprocess.Popen, where: str, timeout_s: float = 10.0):
        self.proc, self.where, self.timeout_s = proc, where, timeout_s
        self._seq = 0
        self._expect("ready")

    def _readline(self) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
        line = self.proc.stdout.readline().decode().strip() if ready else ""
        if not line:
            err = self.proc.stderr.read().decode() if self.proc.poll() is not None and self.proc.stderr else ""
            raise RuntimeError(f"delay line on {self.where} did not answer within {self.timeout_s:g} s "
                               f"(exit code {self.proc.poll()}): {err.strip()[-500:]}")
        return line

    def _expect(self, prefix: str) -> str:
        line = self._readline()
        if not line.startswith(prefix):
            raise RuntimeError(f"delay line on {self.where}: expected {prefix!r}, got {line!r}")
        return line

    def send(self, queues: dict) -> None:
        """Send new queue settings; ``wait_ok`` collects the acknowledgement."""
        assert self.proc.stdin is not None
        self._seq += 1
        self.proc.stdin.write(json.dumps({"seq": self._seq, "queues": queues}).encode() + b"\n")
        self.proc.stdin.flush()

    def wait_ok(self) -> None:
        self._expect(f"ok {self._seq}")

    def stats(self) -> dict[int, int]:
        """Packets delayed so far, per queue."""
        assert self.proc.stdin is not None
        self._seq += 1
        self.proc.stdin.write(json.dumps({"seq": self._seq, "stats": True}).encode() + b"\n")
        self.proc.stdin.flush()
        line = self._expect(f"stats {self._seq} ")
        return {int(q): n for q, n in json.loads(line.split(" ", 2)[2]).items()}

    def close(self, timeout_s: float = 2.0) -> None:
        """End of stdin tells the daemon to release what it holds and exit."""
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(timeout_s)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def _precise_timers() -> None:
    """Ask for 1 us timer slack (default 50 us): releases should wake up on time."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(29, 1)  # PR_SET_TIMERSLACK
    except (OSError, AttributeError):
        pass


class _Stop(Exception):
    """Raised by the SIGTERM/SIGINT handler to leave a blocking select at once."""


def _reply(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testbed.net.delayline", description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="seed of the jitter samples")
    ap.add_argument("--rt-priority", type=int, default=0,
                    help="run under SCHED_FIFO at this priority (0: normal scheduling)")
    args = ap.parse_args(argv)
    if args.rt_priority:
        # a link does not wait for the CPU: on a busy machine a normally scheduled delay line wakes
        # up late (measured: RTT error 0.9-1.8 ms at load 7 on 2 cores, 0.35-0.6 ms with SCHED_FIFO)
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(args.rt_priority))
        except (PermissionError, OSError) as e:
            print(f"delayline: normal scheduling ({e})", file=sys.stderr)
    line = DelayLine(seed=args.seed)

    def stop(_sig, _frame):
        raise _Stop

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    line.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
