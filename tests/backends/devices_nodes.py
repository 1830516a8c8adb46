"""Node servers the way a device's user starts them (`python -m testbed.node --listen ...`), for the
devices backend's tests: every launch goes through ``launch_node`` (one place to add a flag)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from testbed.backends.base import node_not_ready, read_lines, ready_addresses

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Node:
    proc: subprocess.Popen
    address: str  # HOST:PORT it serves on
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it (its user would); SIGKILL after a grace period. Idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout and not self.proc.stdout.closed:
            self.proc.stdout.close()


def launch_node(listen: str, log: Path, env: dict | None = None, prefix: list[str] | None = None,
                extra_args: list[str] | None = None, timeout_s: float = 60.0) -> Node:
    """Start one node server on ``listen`` (``prefix``: e.g. ``ip netns exec NS``; ``env``: added to
    this environment) and wait for the address it prints. It stops if this process dies."""
    argv = [*(prefix or []), sys.executable, "-m", "testbed.node", "--listen", listen, "--watch-parent",
            *(extra_args or [])]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    with open(log, "ab") as f:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=f, env=full_env,
                                cwd=ROOT)
    lines = read_lines(proc, 1, time.monotonic() + timeout_s)
    addrs = ready_addresses(lines)
    if not addrs:
        err = node_not_ready(f"node on {listen}", proc, lines, timeout_s, log)
        Node(proc, "", log).stop(signal.SIGKILL)
        raise err
    proc.stdout.close()  # a node prints nothing after its address
    return Node(proc, addrs[0], log)
