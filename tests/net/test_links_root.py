"""Emulated links deliver their profiles (real Mininet hosts, tc, delay line or netem, iperf3, ping).

One two-host network is built for the module and reshaped live between tests, so these tests
also exercise live changes. Goodput, RTT and loss are held to testbed.net.fidelity's tolerances
(GOODPUT_RATIO, RTT_ERROR_MS, LOSS_SIGMAS), which give the reason for each.
"""

from __future__ import annotations

import json
import statistics

import pytest

from testbed.net.emulation import Emulation
from testbed.net.fidelity import (GOODPUT_RATIO, RTT_ERROR_MS, goodput_ok, iperf_goodput, loss_range, ping,
                                  rtt_ok, start_iperf_server)
from testbed.net.probe import probe
from testbed.net.profile import LinkProfile
from testbed.net.replay import BandwidthTrace, TraceReplay
from testbed.net.topology import topology_from_dict

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def pair():
    topo = topology_from_dict({"name": "pair", "hosts": ["h1", "h2"], "links": [{"a": "h1", "b": "h2"}]})
    with Emulation(topo) as em:
        yield em


def shape(em, **profile) -> LinkProfile:
    prof = LinkProfile(**profile)
    em.apply_profile(prof)
    return prof


@pytest.mark.parametrize("mbps", [10, 50, 200])
def test_goodput_matches_the_configured_bandwidth(pair, mbps):
    shape(pair, bandwidth_mbps=mbps)
    ratio = iperf_goodput(pair, "h1", "h2", seconds=3) / mbps
    assert goodput_ok(ratio), f"goodput/configured = {ratio:.3f} at {mbps} Mbit/s, allowed {GOODPUT_RATIO}"


@pytest.mark.parametrize("delay_ms", [10, 50])
def test_ping_rtt_is_twice_the_one_way_delay(pair, delay_ms):
    # the mechanism the probe picks for this kernel: htb+netem where netem exists, else htb+nfqueue
    assert pair.mechanism == probe(full=False).mechanism
    nfqueue = pair.mechanism == "htb+nfqueue"  # then the delay lines do the work
    before = pair.delay_lines["h1"].stats() if nfqueue else {}
    shape(pair, bandwidth_mbps=100, delay_ms=delay_ms)
    stats = ping(pair, "h1", "h2", count=20, interval_s=0.02)
    rtt, expected = stats.mean_ms, 2 * delay_ms
    assert stats.loss_pct == 0 and rtt_ok(rtt - expected), \
        f"RTT {rtt:.2f} ms (replies {stats.rtts_ms}), configured {expected} ms, allowed +/- {RTT_ERROR_MS} ms"
    if nfqueue:
        assert sum(pair.delay_lines["h1"].stats().values()) >= sum(before.values()) + 20  # replies were held at h1


def test_loss_in_one_direction_is_seen_by_ping(pair):
    # 1600 pings: the binomial spread (sd 0.55 % at 5 %) allows 3.1-6.9 % (400 pings would allow 1.2-8.8 %)
    pair.set_link("h1", "h2", a_to_b=LinkProfile(loss_pct=5), b_to_a=LinkProfile())
    low, high = loss_range(5, 1600)
    loss = ping(pair, "h1", "h2", count=1600, interval_s=0.002).loss_pct
    assert low <= loss <= high, f"{loss}% of 1600 pings lost at 5% configured loss, allowed {low:.2f}-{high:.2f}%"


def test_jitter_spreads_rtts_without_reordering(pair):
    shape(pair, delay_ms=10, jitter_ms=8)
    stats = ping(pair, "h1", "h2", count=300, interval_s=0.002)
    seqs, rtts = stats.seqs, stats.rtts_ms
    assert len(seqs) == 300 and seqs == sorted(seqs), "replies arrived out of order"
    assert statistics.pstdev(rtts) > 1.0 and min(rtts) >= 2 * (10 - 8) - 0.5


def test_bandwidth_trace_replays_live_on_a_running_flow(pair):
    shape(pair, bandwidth_mbps=10)
    trace = BandwidthTrace.from_points([(0, 10), (2.0, 40)], duration_s=10)
    server = start_iperf_server(pair, "h2")
    try:
        replay = TraceReplay(trace, lambda bw: pair.apply_profile(LinkProfile(bandwidth_mbps=bw)), loop=False).start()
        out = pair.node("h1").cmd(f"iperf3 -c {pair.data_ip('h2')} -t 4 -i 1 -J")
        replay.stop()
    finally:
        server.kill()
        server.wait()
        server.stdout.close()
    result = json.loads(out[out.index("{"):])
    assert "error" not in result, result.get("error")  # the connection survived the change
    rates = [iv["sum"]["bits_per_second"] / 1e6 for iv in result["intervals"]]
    assert rates[1] < 11 and rates[-1] > 30, f"per-second goodput {rates}"  # [0] includes filling buffers
    assert [bw for _, bw, _ in replay.log] == [10, 40]


def test_wire_bytes_count_what_the_hosts_sent(pair):
    shape(pair)
    before = pair.wire_bytes()
    pair.node("h1").cmd(f"ping -q -n -c 50 -i 0.005 -s 1000 {pair.data_ip('h2')}")
    sent = pair.wire_bytes() - before
    assert 2 * 50 * 1042 <= sent < 2 * 50 * 1042 + 20_000  # requests + replies (+ ARP, little else)
