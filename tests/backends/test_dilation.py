"""undilate: every duration of an inference divided by the factor; outputs, bytes and events kept."""

from __future__ import annotations

import torch

from testbed.backends.dilation import undilate
from testbed.comm.trace import Collective, Compute, Trace
from testbed.node.records import InferenceResult, RankResult


def _rank(rank: int) -> RankResult:
    trace = Trace(rank, [Compute(0.4, cpu_s=0.15), Collective("all_gather", [("send", 1 - rank, 100), ("recv", 1 - rank, 100)],
                                                   duration_s=0.2, wait_s=0.1, serialize_s=0.02), Compute(0.6)])
    return RankResult(rank, torch.ones(2) if rank == 0 else None, wall_s=1.2, compute_s=1.0, comm_s=0.2, wait_s=0.1,
                      serialize_s=0.02, bytes_sent=100, bytes_recv=100, trace=trace, address=f"n{rank}",
                      token_times_s=[0.5, 0.75, 1.0])


def test_undilate_divides_every_duration_and_keeps_the_rest():
    raw = InferenceResult(output=torch.ones(2), latency_s=1.5, nodes=[_rank(0), _rank(1)])
    res = undilate(raw, 2.5)
    assert res.latency_s == 1.5 / 2.5 and res.output is raw.output
    for r, n in zip(raw.nodes, res.nodes):
        assert (n.wall_s, n.compute_s, n.comm_s, n.wait_s, n.serialize_s) == (1.2 / 2.5, 1.0 / 2.5, 0.2 / 2.5,
                                                                             0.1 / 2.5, 0.02 / 2.5)
        assert (n.rank, n.bytes_sent, n.bytes_recv, n.address) == (r.rank, r.bytes_sent, r.bytes_recv, r.address)
        assert [e.duration_s for e in n.trace.events] == [0.4 / 2.5, 0.2 / 2.5, 0.6 / 2.5]
        assert n.trace.events[0].cpu_s == 0.15  # CPU seconds of the host, as the node measured them
        coll = n.trace.collectives()[0]
        assert coll.ops == r.trace.collectives()[0].ops and coll.wait_s == 0.1 / 2.5
        assert coll.serialize_s == 0.02 / 2.5
        assert n.token_times_s == [0.5 / 2.5, 0.75 / 2.5, 1.0 / 2.5]
    assert raw.nodes[0].trace.events[0].duration_s == 0.4  # the raw result is left as it was
    assert undilate(raw, 1) is raw
