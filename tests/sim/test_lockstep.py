"""The vectorized lockstep replay against the SimPy replay, on the methods' own schedules."""

from __future__ import annotations

import itertools
import random

import pytest

from testbed.comm.trace import Collective, Compute, Trace
from testbed.errors import ConfigError
from testbed.net.profile import LinkProfile
from testbed.sim.engine import Schedule, simulate
from testbed.sim.network import Network, SimTopology, TcpModel, WireModel
from testbed.sim.synth import METHOD_NAMES, skeleton


PARAMS = {"astra": {"groups": 2}, "tensor_parallel:ring": {"all_reduce": "ring"},
          "tensor_parallel:direct": {"all_reduce": "direct"}}


def method_schedule(method: str, n: int, seed: int = 0) -> Schedule:
    """A method's real message pattern with uneven random compute per rank and segment
    (``method:variant`` picks params from PARAMS)."""
    rng = random.Random(seed)
    sk = skeleton("vit-tiny", method.split(":")[0], PARAMS.get(method, {}), 67, n)
    traces = []
    for r in range(n):
        events = []
        for c in sk.collectives[r]:
            events += [Compute(rng.uniform(1e-3, 2e-2)), Collective(c.kind, c.ops, serialize_s=rng.uniform(0, 1e-3))]
        traces.append(Trace(r, events + [Compute(rng.uniform(1e-3, 2e-2))]))
    return Schedule.from_traces(traces)


CASES = list(itertools.product((*METHOD_NAMES, "tensor_parallel:ring", "tensor_parallel:direct"), (2, 4), ("star", "mesh", "shared_medium"),
                               ((10, 5, 0), (100, 1, 1), (1000, 0, 0)), ("steady", "slow_start")))


@pytest.mark.parametrize("method, n, kind, link, tcp_mode", CASES)
def test_lockstep_and_simpy_replays_agree(method, n, kind, link, tcp_mode):
    sched = method_schedule(method, n, seed=n)
    assert sched.lockstep is not None
    bw, delay, loss = link
    net = Network(SimTopology(kind, n, LinkProfile(bw, delay, loss_pct=loss)))
    tcp = TcpModel(mode=tcp_mode, loss_mode="expected")
    ref = simulate(sched, net, WireModel(), tcp, speed=[1.0 + r for r in range(n)], engine="simpy")
    got = simulate(sched, net, WireModel(), tcp, speed=[1.0 + r for r in range(n)], engine="auto")
    # under loss a lost last segment waits for the connection's next one, so arrivals line up with
    # later sends; equal arrival times at a shared link are served in event order by the SimPy replay
    # and in program order by the lock-step one (both FIFO): one message may swap places
    tol = 1e-4 if loss else 1e-9
    assert got.latency_s == pytest.approx(ref.latency_s, rel=tol)
    assert got.bytes_on_wire == ref.bytes_on_wire and got.bytes_sent == ref.bytes_sent
    assert got.messages == ref.messages
    for a, b in zip(got.ranks, ref.ranks):
        assert (a.finish_s, a.compute_s, a.serialize_s, a.wait_s) == pytest.approx(
            (b.finish_s, b.compute_s, b.serialize_s, b.wait_s), rel=tol, abs=1e-12)


def test_where_lockstep_does_not_apply():
    ring = method_schedule("tensor_parallel:ring", 4)
    line = Network(SimTopology("line", 4, LinkProfile(10, 1)))  # a link serves as 1st and 2nd hop
    medium = Network(SimTopology("shared_medium", 4, LinkProfile(10, 1)))  # ring steps share the medium
    for net in (line, medium):
        assert simulate(ring, net, engine="auto").latency_s == simulate(ring, net, engine="simpy").latency_s
        with pytest.raises(ConfigError) as e:
            simulate(ring, net, engine="lockstep")
        assert e.value.field == "engine"
    p2p = [Trace(0, [Collective("send", [("send", 1, 5)])]), Trace(1, [Collective("recv", [("recv", 0, 5)])])]
    assert Schedule.from_traces(p2p).lockstep is None
    with pytest.raises(ConfigError):
        simulate(p2p, Network(SimTopology("star", 2)), engine="lockstep")
    with pytest.raises(ConfigError):
        simulate(p2p, Network(SimTopology("star", 2)), engine="fast")


def test_sampled_loss_and_jitter_have_the_same_mean_in_both_replays():
    sched = method_schedule("sequence_parallel", 4)
    net = Network(SimTopology("star", 4, LinkProfile(50, 4, jitter_ms=2, loss_pct=2)))
    mean = {e: sum(simulate(sched, net, engine=e, seed=s).latency_s for s in range(40)) / 40
            for e in ("simpy", "lockstep")}
    assert mean["lockstep"] == pytest.approx(mean["simpy"], rel=0.15)


@pytest.mark.parametrize("prof", [LinkProfile(20, 4, 1, 2), LinkProfile(None, 0), LinkProfile(500, 10)])
def test_star_paths_built_as_arrays_equal_the_hop_by_hop_ones(prof):
    import numpy as np

    from testbed.sim.lockstep import _Paths
    from testbed.sim.network import Network, SimTopology

    net = Network(SimTopology("star", 6, prof))
    fast = _Paths(net)
    net.kind = None  # the generic path: hop by hop from Network.path
    slow = _Paths(net)
    for name in ("h", "valid", "inv_bps", "delay", "jitter", "rtt", "loss", "bottleneck", "n_resources"):
        assert np.array_equal(np.asarray(getattr(fast, name)), np.asarray(getattr(slow, name))), name
    # resources: the same partition of (pair, hop) into links, whatever the numbering
    pairs = {}
    for a, b, k in zip(*np.nonzero(fast.valid)):
        pairs.setdefault(int(fast.res[a, b, k]), set()).add((a, b, k))
    assert sorted(map(sorted, pairs.values())) == sorted(
        sorted(v) for v in {r: {(a, b, k) for a, b, k in zip(*np.nonzero(slow.valid)) if slow.res[a, b, k] == r}
                            for r in set(slow.res[slow.valid].tolist())}.values())


def test_a_lockstep_schedule_compiles_its_simpy_programs_only_when_asked():
    sched = method_schedule("sequence_parallel", 4)
    assert sched.lockstep is not None and not sched._programs
    net = Network(SimTopology("star", 4, LinkProfile(50, 2)))
    a = simulate(sched, net, engine="lockstep").latency_s
    assert not sched._programs  # the lock-step replay never needed them
    b = simulate(sched, net, engine="simpy").latency_s
    assert len(sched.programs) == 4 and a == pytest.approx(b, rel=1e-9)
