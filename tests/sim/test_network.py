"""Pure parts of the network model: paths, wire bytes, slow start, loss bound."""

from __future__ import annotations

import math

import numpy as np
import pytest

from testbed.errors import ConfigError
from testbed.net.profile import LinkProfile
from testbed.sim.network import (Network, SimTopology, WireModel, mathis_rate_bps, restart_window,
                                  slow_start_extra_s)


def test_paths_per_topology():
    p = LinkProfile(10, 5, loss_pct=1)
    star = Network(SimTopology("star", 3, p))
    assert [h.resource for h in star.path(0, 2)] == ["up0", "down2"]
    # the path (two access hops) has the profile's delay and loss, as topologies/star.yaml's `sweep: half`
    assert star.one_way_s(0, 2) == pytest.approx(0.005)
    assert star.rtt_s(0, 2) == pytest.approx(0.010)
    assert star.loss(0, 2) == pytest.approx(0.01)
    assert star.bottleneck_bps(0, 2) == 10e6
    assert [h.resource for h in Network(SimTopology("mesh", 3, p)).path(2, 0)] == ["link2->0"]
    assert [h.resource for h in Network(SimTopology("shared_medium", 3, p)).path(1, 2)] == ["medium"]
    assert [h.resource for h in Network(SimTopology("line", 4, p)).path(3, 1)] == ["link3->2", "link2->1"]
    assert Network(SimTopology("star", 2)).bottleneck_bps(0, 1) is None


def test_path_rejects_bad_ranks():
    star = Network(SimTopology("star", 2))
    for a, b in [(0, 0), (0, 2), (-1, 1)]:
        with pytest.raises(ConfigError):
            star.path(a, b)


def test_wire_bytes_by_hand():
    w = WireModel()
    # 100 payload + 64 header = 164 stream bytes + one 9-byte frame header = 173, one segment
    assert w.stream_bytes(100) == 173
    assert w.segments(100) == 1
    assert w.wire_bytes(100) == 173 + 66
    assert w.ack_bytes(100) == 66
    assert w.segments(0) == 1  # an empty message still sends its header
    none = WireModel.none()
    assert none.wire_bytes(12345) == 12345 and none.ack_bytes(12345) == 0


def test_slow_start_rounds():
    # unlimited rate: 10, 20, 40 segments in three rounds before the 4th round carries the rest of 100
    extra, w = slow_start_extra_s(100, 10, 0.01, None)
    assert extra == pytest.approx(0.03) and w == 80
    # window already past the BDP: no extra
    assert slow_start_extra_s(1000, 64, 0.01, 1000.0) == (0.0, 64)
    # a message that fits the first window: no extra
    assert slow_start_extra_s(5, 10, 0.01, 100.0)[0] == 0.0
    # rate 1000 seg/s, RTT 0.1 s: BDP 100 segments; rounds of 10, 20, 40, 80 (150 sent in 0.4 s), then full rate
    extra, w = slow_start_extra_s(1000, 10, 0.1, 1000.0)
    assert extra == pytest.approx(0.4 - 150 / 1000.0) and w == 160


def test_mathis_bound():
    assert mathis_rate_bps(1448, 0.02, 0.0) == math.inf
    assert mathis_rate_bps(1448, 0.02, 0.01) == pytest.approx(1448 * 8 / 0.02 * math.sqrt(150))


def test_a_lost_last_segment_waits_for_the_first_of_next_segment_probe_and_rto():
    from testbed.sim.network import TcpModel

    tcp, rtt = TcpModel(), 0.01
    assert tcp.rto_s(rtt) == pytest.approx(0.21)  # srtt + rto_min
    assert tcp.tail_loss_s(1, rtt, 10.0) == pytest.approx(0.21)  # one segment in flight: the RTO
    assert tcp.tail_loss_s(5, rtt, 10.0) == pytest.approx(0.022)  # the probe: 2 RTT + 2 ms
    assert tcp.tail_loss_s(1, rtt, 0.03) == pytest.approx(0.0425)  # the next message after 30 ms + 1.25 RTT
    assert tcp.tail_loss_s(5, rtt, 0.001) == pytest.approx(0.0135)
    assert tcp.tail_loss_s(1, 0.5, 0.0) == pytest.approx(0.625)
    assert TcpModel(min_rto_s=1.0).tail_loss_s(1, rtt, 10.0) == pytest.approx(1.01)
    import numpy as np

    segs, rtts, gaps = np.array([1, 5, 1, 5, 1]), np.array([rtt, rtt, rtt, rtt, 0.5]), np.array([10, 10, 0.03, 0.001, 0])
    assert tcp.tail_loss_s(segs, rtts, gaps).tolist() == pytest.approx(
        [tcp.tail_loss_s(int(a), float(b), float(c)) for a, b, c in zip(segs, rtts, gaps)])


def test_cost_formulas_take_numbers_and_arrays():
    """The SimPy replay calls them per message, the lock-step replay per batch: same numbers."""
    import numpy as np

    from testbed.sim.network import TcpModel, tcp_stall_s, wire_bytes_with_loss

    w = WireModel()
    payload = np.array([0, 100, 20000, 3_000_000])
    for f in (w.stream_bytes, w.segments, w.wire_bytes, w.ack_bytes):
        assert f(payload).tolist() == [f(int(x)) for x in payload]
    assert WireModel.none().ack_bytes(payload).tolist() == [0] * 4
    segs, nbytes = w.segments(payload), w.wire_bytes(payload).astype(float)
    rtt, bw, loss = np.array([0.0, 0.01, 0.05, 0.2]), np.array([np.inf, 1e7, 1e8, 1e6]), np.array([0.0, 0.01, 0, 0.05])
    cwnd, idle = np.array([10.0, 40.0, 10.0, 80.0]), np.array([0.0, 1.0, 0.0, 0.01])
    for tcp in (TcpModel(loss_mode="expected"), TcpModel(mode="steady", loss_mode="expected")):
        on_wire = wire_bytes_with_loss(tcp, segs, nbytes, loss, None)
        stall, after = tcp_stall_s(tcp, w, segs, on_wire, rtt, bw, loss, cwnd, idle, None)
        for i in range(4):
            one = wire_bytes_with_loss(tcp, int(segs[i]), float(nbytes[i]), float(loss[i]), None)
            assert one == pytest.approx(on_wire[i], rel=1e-15)
            s, a = tcp_stall_s(tcp, w, int(segs[i]), one, float(rtt[i]), float(bw[i]), float(loss[i]),
                               float(cwnd[i]), float(idle[i]), None)
            assert (s, a) == pytest.approx((stall[i], after[i]), rel=1e-12)
    assert stall[0] == 0.0 and stall[1] > 0  # unshaped, lossless: free; lossy: tail losses and the Mathis bound


@pytest.mark.parametrize("idle_s, expected", [(0.1, 400.0), (0.25, 400.0), (0.3, 200.0), (0.5, 200.0),
                                              (0.51, 100.0), (10.0, 10.0)])
def test_an_idle_connection_halves_its_window_per_rto_begun_after_the_first(idle_s, expected):
    # Linux tcp_cwnd_restart: while ((delta -= rto) > 0 && cwnd > restart) cwnd >>= 1; RTO 250 ms here
    assert restart_window(400.0, idle_s, 0.25, 10) == expected
    assert restart_window(np.array([400.0, 4.0]), np.array([idle_s, idle_s]), 0.25, 10).tolist() == [expected, 4.0]
