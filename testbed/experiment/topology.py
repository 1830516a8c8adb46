"""What an experiment asks of the links and devices: the topology with the experiment's device
profile on the node hosts, and the bandwidth traces replayed while a cell runs.

Every host that runs a node gets a device: ``nodes.device.speed`` and ``nodes.memory_mb`` of
the experiment, when given, replace those fields of the host's device profile in the topology
(else the host's own apply; speed 1.0 by default), and the device has ``threads`` cores: the
host's own ``threads`` if the topology gives them, else ``nodes.threads`` (the torch thread
count of each node). Hosts without a node keep their profile.
"""

from __future__ import annotations

from dataclasses import replace

from testbed.errors import ConfigError
from testbed.experiment.spec import ExperimentSpec, TraceSpec


def spec_topology(spec: ExperimentSpec):
    """The topology the spec names or holds; backend devices: a full mesh of its devices (h1..hN,
    each with the inventory's device profile), so every ordered pair gets the cell's profile."""
    from testbed.net.topology import DeviceProfile, full_mesh, load_topology

    if spec.backend == "devices" and spec.devices is not None:
        return full_mesh([n.device or DeviceProfile() for n in spec.devices.nodes])
    return load_topology(spec.topology)


def experiment_topology(spec: ExperimentSpec, topology=None):
    """The spec's topology (testbed.net.topology.Topology; ``topology``: already loaded) with the
    experiment's devices on the hosts that run nodes."""
    topo = topology if topology is not None else spec_topology(spec)
    n = spec.nodes
    hosts = []
    for i, h in enumerate(topo.hosts):
        dev = h.device
        if i < n.count:
            dev = replace(dev, speed=n.speed if n.speed is not None else dev.speed,
                          threads=dev.threads if dev.threads is not None else n.threads,
                          memory_mb=n.memory_mb if n.memory_mb is not None else dev.memory_mb)
        hosts.append(replace(h, device=dev))
    return replace(topo, hosts=tuple(hosts))


def node_devices(spec: ExperimentSpec, topology=None) -> list:
    """The device profile (testbed.net.topology.DeviceProfile) of every node, in rank order."""
    topo = experiment_topology(spec, topology)
    hosts = list(topo.hosts[:spec.nodes.count])
    if len(hosts) < spec.nodes.count:  # the simulator scales a topology kind to any N
        hosts += [hosts[-1]] * (spec.nodes.count - len(hosts))
    return [h.device for h in hosts]


def bandwidth_trace(trace: TraceSpec, field: str = "sweep.traces"):
    """The replayable trace of a TraceSpec (inline points or a CSV / Mahimahi file)."""
    from testbed.net.replay import BandwidthTrace, load_trace

    try:
        if trace.path:
            return load_trace(trace.path)
        return BandwidthTrace.from_points(list(trace.points))
    except ConfigError as e:
        raise ConfigError(f"{field}.{'path' if trace.path else 'points'} ({e.field})", e.value, e.allowed) from None


def trace_schedules(spec: ExperimentSpec) -> dict[str, tuple[list, float, bool]]:
    """name -> (points, period_s, loop) of every trace of the sweep, for plots."""
    out = {}
    for t in spec.sweep.traces:
        bt = bandwidth_trace(t)
        out[t.name] = (list(bt.points), bt.duration_s, t.loop)
    return out
