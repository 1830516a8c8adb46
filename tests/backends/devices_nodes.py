"""Node servers the way a device's user starts them (`python -m testbed.node --listen ...`), for the
devices backend's tests; every start goes through testbed.backends.launch.start_node (one place to
add a node flag)."""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from testbed.backends.launch import start_node


@dataclass
class Node:
    proc: subprocess.Popen
    address: str  # HOST:PORT it serves on
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it (as its user would); SIGKILL after a grace period. Idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout and not self.proc.stdout.closed:
            self.proc.stdout.close()


def launch_node(listen: str, log: Path, prefix: list[str] | None = None, args: list[str] | None = None,
                timeout_s: float = 60.0) -> Node:
    """A node server on ``listen`` behind ``prefix`` (e.g. ``ip netns exec NS``), serving once this
    returns; it stops by itself if this process dies (--watch-parent)."""
    proc, address = start_node(listen, log, prefix=prefix, args=["--watch-parent", *(args or [])],
                               timeout_s=timeout_s)
    proc.stdout.close()  # a node prints nothing after its address
    return Node(proc, address, log)
