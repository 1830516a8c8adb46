"""Loopback backend: N node processes on this machine, rank i on 127.0.0.(i+1), no shaping.

For users without root and for fast tests: the same node server, gRPC streams and
orchestrator as under emulation, over the loopback interface. Every node gets its
own address so per-node traffic stays tellable apart. Control and data share one
address (nothing is shaped, so there is nothing to keep apart).

All nodes live in one process group that close() signals (SIGTERM, then SIGKILL);
close() also runs at interpreter exit, and each node watches its parent and stops
if the process that started it dies without closing.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from testbed.backends.base import BackendSetup, NodeBackend, node_not_ready, read_lines, ready_addresses
from testbed.errors import ConfigError, check
from testbed.net.profile import LinkProfile
from testbed.node.records import NodeAddress

MAX_NODES = 254  # 127.0.0.1 .. 127.0.0.254


class LoopbackBackend(NodeBackend):
    name = "loopback"
    mechanism = "none"
    shapes_links = False

    def __init__(self, start_timeout_s: float = 60.0, log_dir: str | None = None, python: str = sys.executable,
                 timeout_s: float = 120.0):
        """``start_timeout_s``: for all nodes to print their address (importing torch takes seconds
        on a busy machine). ``log_dir``: where node logs (stderr) go and stay; default a temporary
        directory removed by close(). ``timeout_s``: deadline of one inference."""
        super().__init__()
        check(isinstance(start_timeout_s, (int, float)) and start_timeout_s > 0, "start_timeout_s",
              start_timeout_s, "a number of seconds > 0")
        self.start_timeout_s, self.python, self.timeout_s = start_timeout_s, python, timeout_s
        self._own_logs = log_dir is None
        self.log_dir = Path(log_dir) if log_dir else None
        self._pgid: int | None = None

    @classmethod
    def from_setup(cls, setup: BackendSetup) -> "LoopbackBackend":
        backend = cls(log_dir=str(setup.log_dir) if setup.log_dir else None, timeout_s=setup.timeout_s)
        backend.log = setup.log
        return backend

    def start_nodes(self, n_nodes: int) -> list[NodeAddress]:
        check(isinstance(n_nodes, int) and 1 <= n_nodes <= MAX_NODES, "n_nodes", n_nodes,
              f"an integer in 1..{MAX_NODES}")
        if self.procs:
            raise ConfigError("n_nodes", n_nodes, "one start() per backend (close() it first)")
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="testbed-loopback-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.close)
        try:
            self.log(f"starting {n_nodes} node servers on loopback")
            for i in range(n_nodes):
                self.procs.append(self._spawn(i))
            deadline = time.monotonic() + self.start_timeout_s
            return [self._await_address(i, deadline) for i in range(n_nodes)]
        except BaseException:
            self.close()
            raise

    def _spawn(self, rank: int) -> subprocess.Popen:
        argv = [self.python, "-m", "testbed.node", "--listen", f"127.0.0.{rank + 1}:0", "--watch-parent"]
        with open(self.log_path(rank), "ab") as log:
            # first node founds the process group, the others join it: one killpg stops all
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                    process_group=0 if self._pgid is None else self._pgid)
        if self._pgid is None:
            self._pgid = proc.pid
        return proc

    def _await_address(self, rank: int, deadline: float) -> NodeAddress:
        proc = self.procs[rank]
        lines = read_lines(proc, 1, deadline)
        addrs = ready_addresses(lines)
        if not addrs:
            raise node_not_ready(f"loopback node {rank}", proc, lines, self.start_timeout_s, self.log_path(rank))
        proc.stdout.close()  # the node prints nothing after its addresses
        return NodeAddress(control=addrs[0], data=addrs[0])

    def log_path(self, rank: int) -> Path:
        assert self.log_dir is not None
        return self.log_dir / f"node{rank}.log"

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def apply_profile(self, profile: LinkProfile) -> None:
        """Loopback links cannot be shaped: only the unshaped profile is accepted."""
        hint = "its default (unshaped) on the loopback backend; use `backend: mininet` to shape links"
        check(profile.bandwidth_mbps is None, "bandwidth_mbps", profile.bandwidth_mbps, f"null, {hint}")
        for name in ("delay_ms", "jitter_ms", "loss_pct"):
            check(getattr(profile, name) == 0, name, getattr(profile, name), f"0, {hint}")
        check(profile.queue_packets is None, "queue_packets", profile.queue_packets, f"null, {hint}")

    def close_nodes(self, grace_s: float = 3.0) -> None:
        """Stop every node (SIGTERM to the group, SIGKILL after ``grace_s``), reap them. Idempotent."""
        atexit.unregister(self.close)
        if self._pgid is not None and any(p.poll() is None for p in self.procs):
            _signal_group(self._pgid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
                time.sleep(0.05)
        if self._pgid is not None:
            _signal_group(self._pgid, signal.SIGKILL)  # also whatever a node may have started
        for p in self.procs:
            p.wait()
            if p.stdout and not p.stdout.closed:
                p.stdout.close()
        self.procs, self._pgid = [], None
        if self._own_logs and self.log_dir is not None:
            shutil.rmtree(self.log_dir, ignore_errors=True)
            self.log_dir = None


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # every member is gone already
