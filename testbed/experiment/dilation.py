"""Time-dilated emulation: how much slower than real time a run goes, so that results do not
depend on the host's cores.

N emulated devices share this host's cores. Without dilation a sharded method is measured on
a fraction of a core per device, and the answer to "does splitting pay off?" changes with the
machine. Dilation by a factor F (Gupta et al., "To Infinity and Beyond: Time-Warped Network
Emulation", NSDI 2006) slows everything a node can observe by F: each device gets a CPU quota of
speed x threads / F cores, each link bandwidth / F and delay x F, and every recorded duration is
divided by F. A run at F therefore takes F times its emulated time on the wall clock, and every
node gets its whole device as long as the quotas fit the host's cores.

``resolve_dilation`` turns the experiment's ``emulation.time_dilation`` into the factor F (``auto``:
the smallest F at which the quotas fit the host's cores less ``reserve_cores``). The factor lives
here and in the backend that applies it (testbed.backends.dilation); nothing below the backend
knows it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from testbed.errors import ConfigError
from testbed.experiment.spec import MAX_DILATION, ExperimentSpec


#: What a factor F does not slow down, so that it is F times shorter in device time than on real links.
UNDILATED = (
    "TCP delayed-ACK timers (40-200 ms; Linux has no per-route knob; gRPC sets TCP_NODELAY, so "
    "only an odd segment at the end of a burst waits for one)",
    "TCP's initial 1 s retransmission timeout of a connection's SYN (connections are opened once, at load)",
    "timer resolution of the delay lines and of htb (tens of microseconds: finer in device time)",
    "sharing of caches and memory bandwidth between devices on one host core (not time, so not dilated)",
)
#: What the backend does dilate beyond CPU and links, by the knobs Linux and gRPC offer.
DILATED_TIMERS = (
    "TCP minimum retransmission timeout (per-route rto_min = 200 ms x F), so a retransmission after a loss "
    "waits as long in device time as on a real link",
    "gRPC keepalive interval and timeout of every node stream (x F)",
    "inference and load deadlines (x F)",
)


@dataclass(frozen=True)
class Dilation:
    factor: float  # F: links F x slower, devices at speed / F, durations recorded / F
    mode: str  # auto | fixed | off (the backend runs in real time)
    host_cores: int  # cores this process may run on
    reserve_cores: float  # of those, left to delay lines, the orchestrator and the kernel (auto)
    demand_cores: float  # sum over nodes of speed x threads: the cores the devices need at F = 1
    nodes: int
    network_core: bool = False  # one of the host's cores is kept for the network: no device runs on it

    @property
    def device_cores(self) -> int:
        """The host cores the devices may be pinned to."""
        return self.host_cores - (1 if self.network_core else 0)

    @property
    def oversubscribed(self) -> bool:
        """The devices' quotas need more cores than the host has: nodes contend, results depend on the host."""
        return self.demand_cores / self.factor > self.device_cores + 1e-9

    def explain(self) -> str:
        """One line for the start of a run."""
        if self.mode == "off":
            return "time dilation: off (this backend runs in real time and does not confine devices)"
        need = f"{self.nodes} node(s) need {self.demand_cores:g} core(s) of this host (speed x threads)"
        have = f"it has {self.host_cores}"
        if self.factor == 1:
            how = "no dilation"
        else:
            how = (f"links run {self.factor:g}x slower, each device at 1/{self.factor:g} of its speed, recorded "
                   f"times are divided by {self.factor:g}, and the sweep takes about {self.factor:g}x its "
                   "emulated time")
        reserve = f", {self.reserve_cores:g} kept for delay lines and the orchestrator" if self.mode == "auto" else ""
        if self.network_core:
            reserve = ", one kept for the network (delay lines, receive processing) and the orchestrator"
        return f"time dilation {self.factor:g}x ({self.mode}): {need}; {have}{reserve}; {how}"

    def warning(self) -> str | None:
        """What is wrong with a factor that leaves the devices contending, or None."""
        if not self.oversubscribed:
            return None
        return (f"warning: {self.nodes} node(s) need {self.demand_cores / self.factor:g} core(s) at time dilation "
                f"{self.factor:g} but this host has {self.device_cores} for them: nodes contend for cores, so compute is "
                "measured slower than on the devices and results depend on this machine. "
                "Fix: `emulation: {time_dilation: auto}`")

    def to_dict(self) -> dict:
        d = {**asdict(self), "oversubscribed": self.oversubscribed, "explanation": self.explain()}
        if self.factor != 1:
            d.update(dilated_timers=list(DILATED_TIMERS), undilated=list(UNDILATED))
        return d


#: other work on the host, in busy cores, above which a dilated run warns that its devices may not get their quotas
BUSY_WARN_CORES = 0.25


def busy_cores(window_s: float = 0.5) -> float | None:
    """Cores of this machine busy over the next ``window_s`` seconds (/proc/stat), or None where unreadable.

    Taken before a run starts its nodes, it is other work: a device's CFS quota is a ceiling, not a
    reservation, so a device on a host core that other work also wants computes slower than its
    profile, and a dilated run's results then depend on that work."""
    import time

    def sample() -> tuple[int, int, int] | None:
        try:
            with open("/proc/stat") as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        fields = [int(v) for v in lines[0].split()[1:]]
        ncpu = sum(1 for ln in lines if ln.startswith("cpu") and ln[3:4].isdigit())
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle, ncpu

    a = sample()
    time.sleep(window_s)
    b = sample()
    if a is None or b is None or b[0] <= a[0]:
        return None
    return round((1 - (b[1] - a[1]) / (b[0] - a[0])) * b[2], 2)


def busy_warning(busy: float | None, dilation: Dilation) -> str | None:
    """A warning when other work kept this host's cores busy as a confining run starts, or None."""
    if busy is None or dilation.mode == "off" or busy <= BUSY_WARN_CORES:
        return None
    return (f"warning: other work kept {busy:g} of this host's cores busy as the run started: each device's "
            "quota is a ceiling, not a reservation, so devices compute slower while it runs and the results "
            "depend on it. Run on a quiet host (see `top`), or read the results as measured under that load")


def device_demand(spec: ExperimentSpec, topology) -> tuple[float, float]:
    """(sum over nodes of speed x threads, fastest device core) of the hosts that run nodes."""
    from testbed.experiment.topology import node_devices

    devices = node_devices(spec, topology)
    return sum(d.speed * d.cores for d in devices), max(d.speed for d in devices)


def resolve_dilation(spec: ExperimentSpec, topology, host_cores: int | None = None) -> Dilation:
    """The factor a run uses; ConfigError (naming the field) when no factor can give every node its device."""
    from testbed.net.cgroups import host_cpus

    cores = host_cores if host_cores is not None else len(host_cpus())
    em = spec.emulation
    demand, fastest = device_demand(spec, topology)
    base = dict(host_cores=cores, reserve_cores=em.reserve_cores, demand_cores=demand, nodes=spec.nodes.count,
                network_core=em.network_core and spec.backend == "mininet")
    if spec.backend != "mininet":
        return Dilation(1.0, "off", **base)
    if em.network_core and cores < 2:
        raise ConfigError("emulation.network_core", True, f"false on this host: it has {cores} core, and a core "
                                                          "kept for the network would leave the devices none")
    if em.time_dilation != "auto":
        f = float(em.time_dilation)
        if fastest > f:
            raise ConfigError("emulation.time_dilation", em.time_dilation,
                              f"a factor >= {fastest:g}, the fastest device's speed (a device core faster than "
                              "this host's needs a dilation at least as large), or auto")
        return Dilation(f, "fixed", **base)
    free = cores - (max(1.0, em.reserve_cores) if em.network_core else em.reserve_cores)
    if free <= 0:
        raise ConfigError("emulation.reserve_cores", em.reserve_cores,
                          f"fewer than this host's {cores} core(s), so that the devices get some")
    f = max(1.0, fastest, demand / free)
    f = math.ceil(f * 100 - 1e-6) / 100  # two decimals, rounded up: the quotas still fit
    if f > MAX_DILATION:
        raise ConfigError("emulation.time_dilation", "auto",
                          f"a factor <= {MAX_DILATION:g}; these nodes need {f:g}x on {cores} core(s) "
                          f"({demand:g} device cores over {free:g} free): fewer nodes or threads, or slower devices")
    return Dilation(f, "auto", **base)
