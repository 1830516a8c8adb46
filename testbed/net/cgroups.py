"""Device profiles as cgroups: CPU share (CFS quota), cores (cpuset) and memory limit of one host.

Written straight to the cgroup file system (v1 as on this machine, or v2), so no cgroup-tools
are needed. ``cpu_share`` follows Mininet's CPULimitedHost: a fraction of the WHOLE machine
(quota = share x period x cores), so 0.25 on a 2-core machine is half a core.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from testbed.net.topology import DeviceProfile

CGROUP_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 100_000  # CFS period; long periods make small shares smoother (Mininet uses the same)


def cgroup_v2() -> bool:
    return (CGROUP_ROOT / "cgroup.controllers").exists()


def _write(path: Path, value: str) -> None:
    path.write_text(value)


class DeviceCgroup:
    """The cgroup(s) of one emulated device, named after its host (so `testbed clean` finds them)."""

    def __init__(self, name: str, device: DeviceProfile, first_core: int = 0):
        self.name, self.device, self.first_core = name, device, first_core
        self.dirs: list[Path] = []

    def _cores(self) -> str:
        n = os.cpu_count() or 1
        k = min(self.device.threads or n, n)
        return ",".join(str((self.first_core + i) % n) for i in range(k))

    def create(self) -> None:
        """Make the cgroup(s) and set the limits. Raises OSError if the kernel refuses."""
        d, ncores = self.device, os.cpu_count() or 1
        quota = None if d.cpu_share is None else max(1000, int(d.cpu_share * PERIOD_US * ncores))
        if cgroup_v2():
            _write(CGROUP_ROOT / "cgroup.subtree_control", "+cpu +cpuset +memory")
            g = CGROUP_ROOT / self.name
            g.mkdir(exist_ok=True)
            self.dirs = [g]
            if quota is not None:
                _write(g / "cpu.max", f"{quota} {PERIOD_US}")
            if d.threads is not None:
                _write(g / "cpuset.cpus", self._cores())
            if d.memory_mb is not None:
                _write(g / "memory.max", str(d.memory_mb << 20))
            return
        for ctrl in ("cpu", "cpuset", "memory"):
            g = CGROUP_ROOT / ctrl / self.name
            g.mkdir(exist_ok=True)
            self.dirs.append(g)
        cpu, cpuset, mem = self.dirs
        if quota is not None:
            _write(cpu / "cpu.cfs_period_us", str(PERIOD_US))
            _write(cpu / "cpu.cfs_quota_us", str(quota))
        # a v1 cpuset takes no task before it has cpus and mems
        _write(cpuset / "cpuset.cpus", self._cores() if d.threads is not None
               else (CGROUP_ROOT / "cpuset" / "cpuset.cpus").read_text().strip())
        _write(cpuset / "cpuset.mems", (CGROUP_ROOT / "cpuset" / "cpuset.mems").read_text().strip())
        if d.memory_mb is not None:
            _write(mem / "memory.limit_in_bytes", str(d.memory_mb << 20))

    def join(self, pid: int | None = None) -> None:
        """Move a process (default: the caller, e.g. from a Popen preexec_fn) into the cgroup(s)."""
        pid = os.getpid() if pid is None else pid
        for g in self.dirs:
            _write(g / "cgroup.procs", str(pid))

    def remove(self, attempts: int = 20) -> None:
        """Remove the cgroup(s); waits briefly for exiting processes to leave them."""
        for g in self.dirs:
            for _ in range(attempts):
                try:
                    g.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # busy: a process is still exiting
                    time.sleep(0.05)
        self.dirs = []
