"""How an experiment drives the Mininet backend: topology with the experiment's device
profile, and bandwidth traces replayed while a cell runs.

``nodes.cpu_share`` / ``nodes.memory_mb`` of the experiment, when given, replace those
fields of every host's device profile in the topology (each host keeps its own cpuset
``threads``); when null the topology's own device profiles apply. ``nodes.threads`` is
the torch thread count of each node (JobSpec.threads), not a CPU limit.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from testbed.errors import ConfigError
from testbed.experiment.spec import ExperimentSpec, TraceSpec
from testbed.net.profile import LinkProfile


def experiment_topology(spec: ExperimentSpec):
    """The spec's topology (testbed.net.topology.Topology) with the experiment's device limits applied."""
    from testbed.net.topology import load_topology

    topo = load_topology(spec.topology)
    n = spec.nodes
    if n.cpu_share is None and n.memory_mb is None:
        return topo
    hosts = []
    for h in topo.hosts:
        dev = h.device
        dev = replace(dev, cpu_share=n.cpu_share if n.cpu_share is not None else dev.cpu_share,
                      memory_mb=n.memory_mb if n.memory_mb is not None else dev.memory_mb)
        hosts.append(replace(h, device=dev))
    return replace(topo, hosts=tuple(hosts))


def mininet_backend(spec: ExperimentSpec, log_dir: Path | None = None):
    from testbed.backends.mininet import MininetBackend

    return MininetBackend(experiment_topology(spec), log_dir=str(log_dir) if log_dir else None, seed=spec.input.seed)


def bandwidth_trace(trace: TraceSpec, field: str = "sweep.traces"):
    """The replayable trace of a TraceSpec (inline points or a CSV / Mahimahi file)."""
    from testbed.net.replay import BandwidthTrace, load_trace

    try:
        if trace.path:
            return load_trace(trace.path)
        return BandwidthTrace.from_points(list(trace.points))
    except ConfigError as e:
        raise ConfigError(f"{field}.{'path' if trace.path else 'points'} ({e.field})", e.value, e.allowed) from None


def start_trace(backend, trace: TraceSpec) -> None:
    """Replay ``trace`` on every swept link of a started backend, with the trace's delay, jitter and loss."""
    if not hasattr(backend, "replay"):
        raise ConfigError("sweep.traces", trace.name, f"a backend that replays traces (mininet), not {backend.name}")
    base = LinkProfile(None, trace.delay_ms, trace.jitter_ms, trace.loss_pct)
    backend.replay(bandwidth_trace(trace), base, loop=trace.loop)


def stop_trace(backend) -> None:
    if hasattr(backend, "stop_replays"):
        backend.stop_replays()


def trace_schedules(spec: ExperimentSpec) -> dict[str, tuple[list, float, bool]]:
    """name -> (points, period_s, loop) of every trace of the sweep, for plots."""
    out = {}
    for t in spec.sweep.traces:
        bt = bandwidth_trace(t)
        out[t.name] = (list(bt.points), bt.duration_s, t.loop)
    return out
