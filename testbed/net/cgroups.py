"""Device profiles as cgroups: CPU speed (CFS quota), cores (cpuset) and memory limit of one host.

Written straight to the cgroup file system (v1 as on this machine, or v2), so no cgroup-tools
are needed. A device of ``speed`` s with ``threads`` t cores gets s x t cores of this host:
each CFS period the cgroup may run ``slice_ms`` per core, and the period is slice_ms / s. So
every core of the device runs in bursts of at most ``slice_ms`` whatever its speed: a block of
model compute is cut into slices that short rather than into one long burst and a long pause
(a fixed 100 ms period would give a quarter-speed device 25 ms on, 75 ms off). The cost of a
short slice is the throttling itself: measured on this kind of machine (testbed.bench.dilation),
slices of a few ms make a throttled forward pass take more CPU time than an unthrottled one.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from testbed.net.topology import DeviceProfile

CGROUP_ROOT = Path("/sys/fs/cgroup")
DEFAULT_SLICE_MS = 10.0
MIN_PERIOD_US, MAX_PERIOD_US = 1_000, 1_000_000  # the kernel's limits on cfs_period_us


def cgroup_v2() -> bool:
    return (CGROUP_ROOT / "cgroup.controllers").exists()


def _write(path: Path, value: str) -> None:
    path.write_text(value)


def cpu_quota(device: DeviceProfile, slice_ms: float = DEFAULT_SLICE_MS) -> tuple[int, int] | None:
    """(quota_us, period_us) of a device, or None when it needs no CPU limit (speed 1, no cores given)."""
    if device.speed == 1 and device.threads is None:
        return None
    period = min(MAX_PERIOD_US, max(MIN_PERIOD_US, round(slice_ms * 1000 / device.speed)))
    return max(1000, round(device.speed * device.cores * period)), period


def allocate_cores(devices: list[DeviceProfile], cpus: list[int]) -> list[list[int] | None]:
    """Pin each device with ``threads`` to that many of ``cpus``, spreading the load (speed per core).

    Greedy, largest device first, each core of a device on the least loaded host core; devices
    without ``threads`` are not pinned (None)."""
    load = {c: 0.0 for c in cpus}
    out: list[list[int] | None] = [None] * len(devices)
    for i in sorted(range(len(devices)), key=lambda i: -(devices[i].speed * devices[i].cores)):
        d = devices[i]
        if d.threads is None:
            continue
        chosen = sorted(cpus, key=lambda c: (load[c], c))[:min(d.threads, len(cpus))]
        for c in chosen:
            load[c] += d.speed
        out[i] = sorted(chosen)
    return out


class DeviceCgroup:
    """The cgroup(s) of one emulated device, named after its host (so `testbed clean` finds them)."""

    def __init__(self, name: str, device: DeviceProfile, cores: list[int] | None = None,
                 slice_ms: float = DEFAULT_SLICE_MS):
        self.name, self.device, self.cores, self.slice_ms = name, device, cores, slice_ms
        self.dirs: list[Path] = []

    def create(self) -> None:
        """Make the cgroup(s) and set the limits. Raises OSError if the kernel refuses."""
        d = self.device
        quota = cpu_quota(d, self.slice_ms)
        cpus = ",".join(map(str, self.cores)) if self.cores else None
        if cgroup_v2():
            _write(CGROUP_ROOT / "cgroup.subtree_control", "+cpu +cpuset +memory")
            g = CGROUP_ROOT / self.name
            g.mkdir(exist_ok=True)
            self.dirs = [g]
            if quota is not None:
                _write(g / "cpu.max", f"{quota[0]} {quota[1]}")
            if cpus is not None:
                _write(g / "cpuset.cpus", cpus)
            if d.memory_mb is not None:
                _write(g / "memory.max", str(d.memory_mb << 20))
            return
        for ctrl in ("cpu", "cpuset", "memory"):
            g = CGROUP_ROOT / ctrl / self.name
            g.mkdir(exist_ok=True)
            self.dirs.append(g)
        cpu, cpuset, mem = self.dirs
        if quota is not None:
            # the period first: a quota is checked against the period in force
            _write(cpu / "cpu.cfs_quota_us", "-1")
            _write(cpu / "cpu.cfs_period_us", str(quota[1]))
            _write(cpu / "cpu.cfs_quota_us", str(quota[0]))
        # a v1 cpuset takes no task before it has cpus and mems
        _write(cpuset / "cpuset.cpus", cpus if cpus is not None
               else (CGROUP_ROOT / "cpuset" / "cpuset.cpus").read_text().strip())
        _write(cpuset / "cpuset.mems", (CGROUP_ROOT / "cpuset" / "cpuset.mems").read_text().strip())
        if d.memory_mb is not None:
            _write(mem / "memory.limit_in_bytes", str(d.memory_mb << 20))

    def cpu_limit(self) -> tuple[int, int] | None:
        """(quota_us, period_us) as the kernel holds them, None when unlimited."""
        if not self.dirs:
            return None
        if cgroup_v2():
            q, p = (self.dirs[0] / "cpu.max").read_text().split()
            return None if q == "max" else (int(q), int(p))
        q = int((self.dirs[0] / "cpu.cfs_quota_us").read_text())
        return None if q < 0 else (q, int((self.dirs[0] / "cpu.cfs_period_us").read_text()))

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


def host_cpus() -> list[int]:
    """The cores this process may run on (a `taskset` or cpuset around the testbed shrinks the host)."""
    return sorted(os.sched_getaffinity(0))
