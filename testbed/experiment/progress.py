"""A progress bar with ETA on stderr (no dependency).

On a terminal it redraws one line; otherwise (CI logs, files) it prints a line
when the work it describes changes (a phase, a cell, a method), else at most every
``log_every_s`` seconds, and at the end, so logs stay short and say what is running.
The ETA extrapolates the mean time per finished step of THIS run (steps
skipped by --resume are counted as done but not timed).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, done: int = 0, stream: TextIO | None = None, enabled: bool = True,
                 log_every_s: float = 10.0):
        self.total, self.done, self.skipped = total, done, done
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty() if hasattr(self.stream, "isatty") else False
        self.t0 = time.monotonic()
        self.log_every_s, self._last_log = log_every_s, 0.0
        self.what = ""

    def step(self, n: int = 1, what: str | None = None) -> None:
        self.done += n
        self.show(what)

    def show(self, what: str | None = None) -> None:
        changed = what is not None and what != self.what
        if what is not None:
            self.what = what
        if not self.enabled:
            return
        now = time.monotonic()
        if not self.tty and not changed and self.done < self.total and now - self._last_log < self.log_every_s:
            return
        self._last_log = now
        line = self.render(now)
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def render(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = now - self.t0
        measured = self.done - self.skipped
        left = self.total - self.done
        eta = elapsed / measured * left if measured > 0 else None
        width = 24
        fill = int(width * self.done / self.total) if self.total else width
        bar = "#" * fill + "." * (width - fill)
        eta_s = _fmt(eta) if eta is not None else "?"
        return f"[{bar}] {self.done}/{self.total} rows  {_fmt(elapsed)} elapsed  ETA {eta_s}  {self.what}"[:160]

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _fmt(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
