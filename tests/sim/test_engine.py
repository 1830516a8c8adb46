"""The replay against closed-form latencies on hand-made traces."""

from __future__ import annotations

import math

import pytest
import torch

from testbed.comm import run_inprocess
from testbed.comm.trace import Collective, Compute, Trace
from testbed.errors import ConfigError
from testbed.net.profile import LinkProfile
from testbed.sim.engine import Schedule, simulate
from testbed.sim.network import Network, SimTopology, TcpModel, WireModel

STEADY = TcpModel(mode="steady")


@pytest.fixture(params=["simpy", "lockstep"])
def engine(request):
    """Every closed-form check runs on both replays (the lockstep one where the schedule allows it)."""
    return request.param


def all_gather_traces(n: int, nbytes: int, compute_s: float) -> list[Trace]:
    """What Communicator.all_gather records: send to every peer (starting after self), then recv from each."""
    traces = []
    for r in range(n):
        peers = [(r + i) % n for i in range(1, n)]
        ops = [("send", p, nbytes) for p in peers] + [("recv", p, nbytes) for p in peers]
        traces.append(Trace(r, [Compute(compute_s), Collective("all_gather", ops)]))
    return traces


def ring_all_reduce_traces(n: int, nbytes: int) -> list[Trace]:
    """What Communicator.all_reduce records: 2(N-1) steps of send right / recv left, nbytes/N each."""
    chunk = nbytes // n
    traces = []
    for r in range(n):
        ops = []
        for _ in range(2 * (n - 1)):
            ops += [("send", (r + 1) % n, chunk), ("recv", (r - 1) % n, chunk)]
        traces.append(Trace(r, [Collective("all_reduce", ops)]))
    return traces


def net(kind: str, n: int, mbps: float | None = 10, delay_ms: float = 5, **kw) -> Network:
    return Network(SimTopology(kind, n, LinkProfile(mbps, delay_ms, **kw)))


def test_two_ranks_all_gather_without_overhead_is_compute_plus_bytes_over_rate_plus_delay(engine):
    # star: a->b crosses a's uplink and b's downlink, 2.5 ms each (the path has the profile's 5 ms)
    res = simulate(all_gather_traces(2, 1_000_000, 0.010), net("star", 2), WireModel.none(), STEADY, engine=engine)
    assert res.latency_s == pytest.approx(0.010 + 1_000_000 * 8 / 10e6 + 0.005, rel=1e-12)
    assert res.bytes_sent == 2_000_000
    assert res.bytes_on_wire == 2_000_000
    assert [s.compute_s for s in res.ranks] == [pytest.approx(0.010)] * 2
    assert res.critical.comm_s == pytest.approx(0.805, rel=1e-12)
    assert res.critical.wait_s == pytest.approx(0.805, rel=1e-12)


def expected_wire_bytes(payload: int) -> int:
    framed = payload + 64  # message header
    stream = framed + math.ceil(framed / 16384) * 9  # HTTP/2 DATA frame headers
    return stream + math.ceil(stream / 1448) * 66  # TCP/IP + Ethernet per segment


def test_two_ranks_all_gather_with_overhead(engine):
    wire = WireModel(per_message_s=0.001)
    res = simulate(all_gather_traces(2, 1_000_000, 0.010), net("star", 2), wire, STEADY, engine=engine)
    wb = expected_wire_bytes(1_000_000)
    assert wb == 1_046_294  # worked by hand: 692 segments
    acks = math.ceil(692 / 2) * 66
    # each uplink carries its message and the ACKs of the one it receives (as many bytes as its own ACKs)
    assert res.latency_s == pytest.approx(0.010 + 0.001 + (wb + acks) * 8 / 10e6 + 0.005, rel=1e-12)
    assert res.bytes_on_wire == 2 * (wb + acks)


def test_slow_start_adds_rounds_until_the_window_covers_the_bdp(engine):
    # RTT 20 ms at 10 Mbit/s with 1514-byte frames: BDP = 16.5 segments; IW 10 -> one round, then full rate
    res = simulate(all_gather_traces(2, 1_000_000, 0.010), net("star", 2, delay_ms=10), WireModel(ack_every=0),
                   TcpModel(mode="slow_start", warm=False), engine=engine)
    seg_rate = 10e6 / (8 * 1514)
    extra = 0.020 - 10 / seg_rate
    assert res.latency_s == pytest.approx(0.010 + expected_wire_bytes(1_000_000) * 8 / 10e6 + 0.010 + extra, rel=1e-12)


@pytest.mark.parametrize("compute_s, restarts", [(0.010, False), (0.300, True)])
def test_a_warm_connection_keeps_the_window_of_the_inference_before_unless_idle_past_the_rto(engine, compute_s,
                                                                                             restarts):
    """Warm (the default): the replayed inference follows one of the same schedule, whose window covers the
    BDP; 300 ms between the last send of the one and the first of the next exceeds the RTO (220 ms), and the
    window restarts from the initial one as on a cold connection."""
    traces, topo, wire = all_gather_traces(2, 1_000_000, compute_s), net("star", 2, delay_ms=10), WireModel(ack_every=0)
    warm = simulate(traces, topo, wire, TcpModel(mode="slow_start"), engine=engine).latency_s
    cold = simulate(traces, topo, wire, TcpModel(mode="slow_start", warm=False), engine=engine).latency_s
    steady = simulate(traces, topo, wire, STEADY, engine=engine).latency_s
    assert cold > steady
    assert warm == pytest.approx(cold if restarts else steady, rel=1e-12)


def test_shared_medium_is_n_times_slower_than_star_for_an_all_gather_and_mesh_n_minus_1_times_faster(engine):
    n, size = 4, 250_000
    traces = all_gather_traces(n, size, 0.0)
    lat = {k: simulate(traces, net(k, n, delay_ms=0), WireModel.none(), STEADY, engine=engine).latency_s
           for k in ("star", "shared_medium", "mesh")}
    x = size * 8 / 10e6
    assert lat["mesh"] == pytest.approx(x, rel=1e-12)
    assert lat["star"] == pytest.approx((n - 1) * x, rel=1e-12)
    assert lat["shared_medium"] == pytest.approx(n * (n - 1) * x, rel=1e-12)
    assert lat["shared_medium"] / lat["star"] == pytest.approx(n, rel=1e-12)


def test_ring_all_reduce_is_2_n_minus_1_dependent_steps(engine):
    n, size = 4, 400_000
    res = simulate(ring_all_reduce_traces(n, size), net("star", n), WireModel.none(), STEADY, engine=engine)
    step = size / n * 8 / 10e6 + 0.005
    assert res.latency_s == pytest.approx(2 * (n - 1) * step, rel=1e-12)
    assert res.bytes_sent == n * 2 * (n - 1) * size // n


def test_line_crosses_every_link_in_between():
    traces = [Trace(0, [Collective("send", [("send", 3, 1000)])]), Trace(1, []), Trace(2, []),
              Trace(3, [Collective("recv", [("recv", 0, 1000)])])]
    res = simulate(traces, net("line", 4), WireModel.none(), STEADY)
    assert res.latency_s == pytest.approx(1000 * 8 / 10e6 + 3 * 0.005, rel=1e-12)


def test_unshaped_links_cost_only_delay(engine):
    res = simulate(all_gather_traces(3, 10**9, 0.0), net("star", 3, mbps=None, delay_ms=1), WireModel.none(), STEADY,
                   engine=engine)
    assert res.latency_s == pytest.approx(0.001, rel=1e-12)


def test_speed_factors_scale_compute_per_device(engine):
    traces = all_gather_traces(2, 1000, 0.010)
    res = simulate(traces, net("mesh", 2, delay_ms=0), WireModel.none(), STEADY, speed=[1.0, 3.0], engine=engine)
    assert res.ranks[1].compute_s == pytest.approx(0.030)
    # rank 0 waits for rank 1's message, sent after 30 ms of compute
    assert res.latency_s == pytest.approx(0.030 + 1000 * 8 / 10e6, rel=1e-12)
    assert res.critical.rank in (0, 1)


def test_serialization_time_counts_as_compute():
    t0 = Trace(0, [Collective("send", [("send", 1, 100)], serialize_s=0.002)])
    t1 = Trace(1, [Collective("recv", [("recv", 0, 100)], serialize_s=0.003)])
    res = simulate([t0, t1], net("mesh", 2, mbps=None, delay_ms=0), WireModel.none(), STEADY, speed=[1.0, 2.0])
    assert res.latency_s == pytest.approx(0.006)
    assert res.ranks[0].serialize_s == pytest.approx(0.002) and res.ranks[0].compute_s == 0
    assert res.ranks[1].serialize_s == pytest.approx(0.006)
    assert res.ranks[1].comm_s == pytest.approx(0.006)  # as in the runtime's traces: inside the collective


@pytest.mark.parametrize("compute_s", [0.0, 0.004, 1.0])
def test_expected_loss_cost_of_a_one_segment_message(engine, compute_s):
    """A lost one-segment message waits for the connection's next segment (taken after the same gap as
    before it, here the compute before the first send) plus RACK's window, or else for the RTO; a lost
    repair the same once more (RACK marks a retransmission lost by later data too)."""
    p, d = 0.05, 0.005
    wire = WireModel.none()
    res = simulate(all_gather_traces(2, 100, compute_s), net("mesh", 2, delay_ms=d * 1e3, loss_pct=p * 100),
                   wire, TcpModel(mode="steady", loss_mode="expected"), engine=engine)
    nbytes = 100 / (1 - p)  # retransmissions in expectation
    rtt = 2 * d
    tail = min(rtt + 0.2, compute_s + 1.25 * rtt)  # 1 s of compute: the RTO comes first
    mathis = 1448 * 8 / rtt * math.sqrt(1.5 / p)
    stall = p * (tail + p * tail) + max(0.0, nbytes * 8 / mathis - nbytes * 8 / 10e6)
    assert res.latency_s == pytest.approx(compute_s + nbytes * 8 / 10e6 + d + stall, rel=1e-9)
    assert res.bytes_on_wire == round(2 * nbytes)


def test_sampled_loss_is_reproducible_per_seed_and_costs_a_loss_probe():
    topo = net("star", 4, loss_pct=5)
    traces = Schedule.from_traces(all_gather_traces(4, 2000, 0.5) * 1)  # 2 segments, a long gap before
    runs = [simulate(traces, topo, seed=s).latency_s for s in range(20)]
    assert runs[0] == simulate(traces, topo, seed=0).latency_s
    lossless = simulate(traces, net("star", 4), seed=0).latency_s
    assert min(runs) >= lossless
    assert max(runs) >= lossless + 2 * 0.005  # at least one seed lost a last segment: 2 RTT + 2 ms


def test_real_traces_from_the_communicator_replay():
    def body(rank, comm):
        comm.trace.start()
        x = torch.full((256,), float(rank))
        comm.all_gather(x)
        comm.all_reduce(x)
        comm.trace.finish()
        return comm.trace.to_dict()

    traces = run_inprocess(3, body)
    res = simulate(traces, net("star", 3, mbps=1, delay_ms=1))
    # all_gather: 3 ranks x 2 peers x 1 KiB; ring all_reduce: each of 2(N-1) steps moves every chunk once
    assert res.bytes_sent == 3 * 2 * 1024 + 2 * 2 * 1024
    assert res.latency_s > 1024 * 8 / 1e6  # at least one tensor over a 1 Mbit/s link


@pytest.mark.parametrize("bad, field", [
    (lambda: SimTopology("ring", 4), "topology"),
    (lambda: SimTopology("star", 0), "nodes"),
    (lambda: SimTopology("star", 2, profile={"bandwidth_mbps": 10}), "profile"),
    (lambda: WireModel(mss_bytes=0), "mss_bytes"),
    (lambda: WireModel(per_message_s=-1), "per_message_s"),
    (lambda: TcpModel(mode="reno"), "tcp_mode"),
    (lambda: TcpModel(loss_mode="sometimes"), "loss_mode"),
    (lambda: TcpModel(min_rto_s=-0.1), "min_rto_s"),
    (lambda: TcpModel(probe_floor_s=-0.001), "probe_floor_s"),
    (lambda: simulate(all_gather_traces(2, 10, 0), net("star", 3)), "traces"),
    (lambda: simulate(all_gather_traces(2, 10, 0), net("star", 2), speed=0), "speed_factors"),
    (lambda: simulate(all_gather_traces(2, 10, 0), net("star", 2), speed=[1.0]), "speed_factors"),
    (lambda: simulate([Trace(0, [Collective("send", [("send", 1, 5)])]), Trace(1, [])], net("star", 2)), "traces"),
    (lambda: simulate([Trace(0, [Collective("send", [("send", 7, 5)])]), Trace(1, [])], net("star", 2)),
     "trace peer"),
    (lambda: simulate([Trace(0, [Compute(-1.0)]), Trace(1, [])], net("star", 2)), "trace duration_s"),
    (lambda: simulate(list(reversed(all_gather_traces(2, 10, 0))), net("star", 2)), "traces"),
])
def test_invalid_inputs_raise_config_error_naming_the_field(bad, field):
    with pytest.raises(ConfigError) as e:
        bad()
    assert e.value.field == field


def test_recvs_waiting_on_each_other_are_reported_not_hung():
    deadlock = [Trace(r, [Collective("recv", [("recv", 1 - r, 8)]), Collective("send", [("send", 1 - r, 8)])])
                for r in range(2)]
    with pytest.raises(ConfigError, match="never finish"):
        simulate(deadlock, net("star", 2))


def test_the_stack_rate_bounds_unshaped_and_fast_links(engine):
    wire = WireModel(segment_header_bytes=0, frame_header_bytes=0, message_header_bytes=0, ack_every=0,
                     stack_bytes_per_s=1e6)
    unshaped = simulate(all_gather_traces(2, 500_000, 0.0), net("mesh", 2, mbps=None, delay_ms=0), wire, STEADY,
                        engine=engine)
    assert unshaped.latency_s == pytest.approx(0.5)  # 500 kB at 1 MB/s
    slow_link = simulate(all_gather_traces(2, 500_000, 0.0), net("mesh", 2, mbps=1, delay_ms=0), wire, STEADY,
                         engine=engine)
    assert slow_link.latency_s == pytest.approx(4.0)  # the 1 Mbit/s link is the slower one
