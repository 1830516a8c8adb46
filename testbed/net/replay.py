"""Bandwidth traces (CSV or Mahimahi) replayed live on emulated links during a run.

Formats:
- CSV: rows ``time_s,bandwidth_mbps`` (a header line is allowed), times strictly increasing from
  0. Each bandwidth holds until the next row's time; the last one holds for the median step.
- Mahimahi packet-delivery trace (mm-link): one integer per line, a millisecond at which one
  1500-byte packet may be delivered (repeated lines: several packets that millisecond); the
  trace loops with period = its last timestamp. It is binned into ``bin_ms`` windows
  (default 100 ms) and each window becomes a rate; an empty window becomes MIN_BANDWIDTH_MBPS
  (htb needs a rate > 0; a real outage would stall TCP for as long).

A replay runs in a thread and calls ``apply(bandwidth_mbps)`` at every step (the Mininet backend
reshapes every shaped link with ``tc class change``; one step costs milliseconds, see
Emulation.apply); it falls behind rather than compressing time, and keeps a log of what it applied.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from testbed.errors import ConfigError, check
from testbed.net.profile import MAX_BANDWIDTH_MBPS

MIN_BANDWIDTH_MBPS = 0.01  # what an empty Mahimahi window becomes
MAHIMAHI_PACKET_BYTES = 1500


@dataclass(frozen=True)
class BandwidthTrace:
    points: tuple[tuple[float, float], ...]  # (time_s, bandwidth_mbps), from 0, strictly increasing
    duration_s: float  # one period; the replay loops after it (when asked to)

    def __post_init__(self) -> None:
        check(len(self.points) >= 1, "trace", "empty", "at least one (time_s, bandwidth_mbps) point")
        check(self.points[0][0] == 0, "trace.time_s", self.points[0][0], "0 for the first point")
        for i, (t, bw) in enumerate(self.points):
            check(0 < bw <= MAX_BANDWIDTH_MBPS, f"trace[{i}].bandwidth_mbps", bw, f"a number in (0, {MAX_BANDWIDTH_MBPS:g}]")
            if i:
                check(t > self.points[i - 1][0], f"trace[{i}].time_s", t, "larger than the previous time")
        check(self.duration_s > self.points[-1][0], "trace.duration_s", self.duration_s, "after the last point's time")

    @classmethod
    def from_points(cls, points: list[tuple[float, float]], duration_s: float | None = None) -> "BandwidthTrace":
        pts = tuple((float(t), float(b)) for t, b in points)
        if duration_s is None:
            steps = [b[0] - a[0] for a, b in zip(pts, pts[1:])]
            duration_s = pts[-1][0] + (statistics.median(steps) if steps else 1.0)
        return cls(pts, duration_s)

    def bandwidth_at(self, t_s: float, loop: bool = True) -> float:
        """Bandwidth at ``t_s`` seconds after the start (the last point holds on when not looping)."""
        if loop:
            t_s %= self.duration_s
        current = self.points[0][1]
        for t, bw in self.points:
            if t > t_s:
                break
            current = bw
        return current


def load_csv(path: str | Path) -> BandwidthTrace:
    points = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        cells = [c.strip() for c in line.split(",")]
        try:
            points.append((float(cells[0]), float(cells[1])))
        except (ValueError, IndexError):
            if points or n > 1:
                raise ConfigError(f"{path}:{n}", line, "time_s,bandwidth_mbps (two numbers)") from None
    return BandwidthTrace.from_points(points)


def load_mahimahi(path: str | Path, bin_ms: float = 100.0) -> BandwidthTrace:
    check(bin_ms > 0, "bin_ms", bin_ms, "a number of milliseconds > 0")
    stamps = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                stamps.append(int(line.strip()))
            except ValueError:
                raise ConfigError(f"{path}:{n}", line, "one integer millisecond per line (Mahimahi trace)") from None
    check(bool(stamps) and stamps[-1] > 0, str(path), "empty", "a Mahimahi trace with a last timestamp > 0 ms")
    period_ms = stamps[-1]
    n_bins = max(1, int(-(-period_ms // bin_ms)))
    counts = [0] * n_bins
    for s in stamps:
        counts[min(int(s // bin_ms), n_bins - 1)] += 1
    mbps = [max(MIN_BANDWIDTH_MBPS, c * MAHIMAHI_PACKET_BYTES * 8 / (bin_ms / 1e3) / 1e6) for c in counts]
    return BandwidthTrace.from_points([(i * bin_ms / 1e3, b) for i, b in enumerate(mbps)], period_ms / 1e3)


def load_trace(path: str | Path, bin_ms: float = 100.0) -> BandwidthTrace:
    """CSV if the first data line has a comma, else Mahimahi."""
    p = Path(path)
    check(p.is_file(), "trace", str(path), "an existing CSV (time_s,bandwidth_mbps) or Mahimahi trace file")
    first = next((ln for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")), "")
    return load_csv(p) if "," in first else load_mahimahi(p, bin_ms)


class TraceReplay:
    """Calls ``apply(bandwidth_mbps)`` at each step of ``trace`` in a background thread."""

    def __init__(self, trace: BandwidthTrace, apply: Callable[[float], object], loop: bool = True):
        self.trace, self.apply, self.loop = trace, apply, loop
        self.log: list[tuple[float, float, float]] = []  # (planned time_s, bandwidth_mbps, seconds late)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trace-replay", daemon=True)

    def start(self) -> "TraceReplay":
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def _schedule(self):
        period = 0.0
        while True:
            for t, bw in self.trace.points:
                yield period + t, bw
            if not self.loop:
                return
            period += self.trace.duration_s

    def _run(self) -> None:
        try:
            last = None
            for t, bw in self._schedule():
                if self._stop.wait(max(0.0, self.t0 + t - time.monotonic())):
                    return
                if bw != last:
                    self.apply(bw)
                    last = bw
                self.log.append((t, bw, time.monotonic() - self.t0 - t))
        except BaseException as e:  # noqa: BLE001 - reported by stop()
            self.error = e

    def stop(self) -> None:
        """Stop replaying (the link keeps the last bandwidth); re-raises an error the replay hit."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.error is not None:
            err, self.error = self.error, None
            raise err
