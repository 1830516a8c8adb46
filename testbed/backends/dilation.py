"""Time dilation at the backend: what a node measured in dilated time, turned back into device time.

A backend that runs its nodes F times slower than real time (devices at speed / F, links at
bandwidth / F and delay x F; testbed.experiment.dilation says why) hands the runner a
``DilatedClient``: the same load / infer / shutdown surface as the Orchestrator, with every
deadline multiplied by F and every duration of a result divided by F. Outputs, byte counts and
the order of events are the nodes' own; only time is rescaled. ``last_raw`` keeps the
undivided result of the latest inference, as the nodes reported it.
"""

from __future__ import annotations

from dataclasses import replace

from testbed.comm.trace import Collective, Compute, Trace
from testbed.node.orchestrator import Orchestrator
from testbed.node.records import InferenceResult, RankResult


def undilate_trace(trace: Trace, factor: float) -> Trace:
    events: list[Compute | Collective] = []
    for e in trace.events:
        if isinstance(e, Compute):
            events.append(Compute(e.duration_s / factor, cpu_s=e.cpu_s))  # CPU seconds of the host: as measured
        else:
            events.append(replace(e, ops=list(e.ops), duration_s=e.duration_s / factor, wait_s=e.wait_s / factor,
                                  serialize_s=e.serialize_s / factor))
    return Trace(rank=trace.rank, events=events)


def undilate_rank(r: RankResult, factor: float) -> RankResult:
    return replace(r, wall_s=r.wall_s / factor, compute_s=r.compute_s / factor, comm_s=r.comm_s / factor,
                   wait_s=r.wait_s / factor, serialize_s=r.serialize_s / factor,
                   trace=undilate_trace(r.trace, factor), token_times_s=[t / factor for t in r.token_times_s])


def undilate(result: InferenceResult, factor: float) -> InferenceResult:
    """``result`` with every duration divided by ``factor`` (outputs and bytes unchanged)."""
    if factor == 1:
        return result
    return InferenceResult(output=result.output, latency_s=result.latency_s / factor,
                           nodes=[undilate_rank(n, factor) for n in result.nodes])


class DilatedClient:
    """An Orchestrator whose deadlines are ``factor`` x the requested ones and whose results are in device time."""

    def __init__(self, addresses, factor: float, timeout_s: float, load_timeout_s: float,
                 connect_timeout_s: float = 10.0):
        self.factor = factor
        self.orchestrator = Orchestrator(addresses, timeout_s=timeout_s * factor, load_timeout_s=load_timeout_s * factor,
                                         connect_timeout_s=connect_timeout_s * factor)
        self.last_raw: InferenceResult | None = None

    def load(self, job):
        return self.orchestrator.load(job)

    def infer(self) -> InferenceResult:
        raw = self.orchestrator.infer()
        self.last_raw = raw
        return undilate(raw, self.factor)

    def stats(self):
        return self.orchestrator.stats()

    def probe(self) -> list[float]:
        """The nodes' probe in CPU seconds, as measured: a ratio to a free core's, not a duration to undilate."""
        return self.orchestrator.probe()

    def shutdown(self) -> None:
        self.orchestrator.shutdown()
