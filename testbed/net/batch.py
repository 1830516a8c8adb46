"""Long-running ``tc``/``ip`` batch processes, one per namespace, so a live change costs no fork.

Starting ``mnexec ... tc`` takes 3-5 ms (much more on a loaded machine), and a change of a whole
star needs several; a trace replayed in 100 ms steps cannot afford that. Both tools read
``-batch -`` line by line, and under ``stdbuf -oL -eL`` answer at once, so each namespace keeps
one of each running. ``-force`` keeps them alive after a failed command; a block of commands is
closed by a marker command that fails on purpose (a device that cannot exist), and every other
line of output before the marker's is an error of that block.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from typing import Callable

from testbed.errors import check

MARKER_CMD = {"tc": "qdisc show dev {name}", "ip": "link show dev {name}"}


class BatchError(RuntimeError):
    """A command of a batch block was refused; the message has the command and the tool's reply."""


class Batch:
    """One ``<tool> -force -batch -`` process; ``run(lines)`` sends a block and waits for it."""

    def __init__(self, tool: str, spawn: Callable[[list[str]], subprocess.Popen], where: str):
        check(tool in MARKER_CMD, "tool", tool, ", ".join(MARKER_CMD))
        self.tool, self.where = tool, where
        self.proc = spawn(["stdbuf", "-oL", "-eL", tool, "-force", "-batch", "-"])
        self._fd = self.proc.stdout.fileno()
        self._buf = b""
        self._lines_sent = 0
        self._seq = 0
        self._pending: dict[int, str] = {}  # line number -> command (for error messages)

    def send(self, lines: list[str]) -> str:
        """Queue a block; returns the marker name that ``wait`` looks for."""
        self._seq += 1
        marker = f"tbmk{os.getpid() % 10000}x{self._seq % 1000}"
        for line in lines:
            self._lines_sent += 1
            self._pending[self._lines_sent] = line
        self._lines_sent += 1
        text = "".join(ln + "\n" for ln in lines) + MARKER_CMD[self.tool].format(name=marker) + "\n"
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()
        return marker

    def wait(self, marker: str, timeout_s: float = 10.0) -> None:
        """Read the tool's answers up to ``marker``; raise BatchError for any refused command."""
        errors, deadline = [], time.monotonic() + timeout_s
        while True:
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                ready, _, _ = select.select([self._fd], [], [], max(0.0, left))
                chunk = os.read(self._fd, 65536) if ready else b""
                if not chunk:
                    raise BatchError(f"{self.tool} batch in {self.where} stopped answering "
                                     f"(exit code {self.proc.poll()}); errors so far: {errors}")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\n", 1)
            line = raw.decode(errors="replace").strip()
            if marker in line:
                self._skip_failed_line()
                break
            if line.startswith("Command failed -:"):
                n = int(line.rsplit(":", 1)[1])
                errors.append(f"{self._pending.get(n, '?')!r}: {errors.pop() if errors else 'failed'}")
            elif line:
                errors.append(line)
        self._pending.clear()
        if errors:
            raise BatchError(f"{self.tool} in {self.where}: " + "; ".join(errors))

    def _skip_failed_line(self) -> None:
        """The marker is followed by its own 'Command failed' line; drop it when it comes."""
        while b"\n" not in self._buf:
            ready, _, _ = select.select([self._fd], [], [], 5.0)
            chunk = os.read(self._fd, 65536) if ready else b""
            if not chunk:
                return
            self._buf += chunk
        raw, rest = self._buf.split(b"\n", 1)
        if raw.startswith(b"Command failed"):
            self._buf = rest

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(2)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
