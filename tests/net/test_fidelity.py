"""The one set of fidelity tolerances and how `testbed fidelity` applies it (pure; no root)."""

from __future__ import annotations

import math

from testbed.net.fidelity import (GOODPUT_RATIO, RTT_ERROR_MS, FidelityRow, format_table, goodput_ok, loss_range,
                                  rtt_ok)


def test_goodput_ceiling_is_above_tcp_payload_share_and_floor_below_it():
    payload_share = 1448 / 1514  # full TCP segments with timestamps over Ethernet frames
    assert GOODPUT_RATIO[0] < payload_share <= GOODPUT_RATIO[1]
    assert goodput_ok(0.95) and not goodput_ok(0.92) and not goodput_ok(1.01)


def test_rtt_error_is_absolute_whatever_the_round_trip():
    assert rtt_ok(RTT_ERROR_MS) and rtt_ok(-RTT_ERROR_MS) and not rtt_ok(RTT_ERROR_MS + 0.01)


def test_loss_range_is_the_binomial_spread():
    low, high = loss_range(5, 1600)
    sd = 100 * math.sqrt(0.05 * 0.95 / 1600)
    assert math.isclose(high - 5, 3.5 * sd) and math.isclose(5 - low, 3.5 * sd)
    assert loss_range(0, 20) == (0.0, 0.0) and loss_range(50, 4) == (0.0, 100.0)


def test_rows_are_marked_against_the_tolerances():
    good = FidelityRow("h1", "h2", 10, 5, 0, goodput_mbps=9.5, goodput_ratio=0.95, rtt_expected_ms=10,
                       rtt_ms=10.5, rtt_error_ms=0.5, ping_loss_pct=0)
    slow = FidelityRow("h1", "h3", 10, 5, 0, goodput_mbps=8.0, goodput_ratio=0.80, rtt_expected_ms=10,
                       rtt_ms=10.5, rtt_error_ms=0.5, ping_loss_pct=0)
    unshaped = FidelityRow("h2", "h3", None, 0, 0, rtt_ms=0.1, rtt_error_ms=0.1, ping_loss_pct=0)
    # plain ping on a direct link misses the reply's delay (held by h1's receive side): expected 5, not 10
    direct = FidelityRow("h1", "h4", None, 5, 0, rtt_expected_ms=10, rtt_ms=10.4, rtt_error_ms=0.4,
                         held="receiver/receiver", rtt_plain_expected_ms=5, rtt_plain_ms=5.3, rtt_plain_error_ms=0.3)
    plain_short = FidelityRow("h1", "h2", None, 5, 0, rtt_expected_ms=10, rtt_ms=10.4, rtt_error_ms=0.4,
                              held="switch/switch", rtt_plain_expected_ms=10, rtt_plain_ms=5.3,
                              rtt_plain_error_ms=-4.7)
    assert good.ok() and not slow.ok() and unshaped.ok() and direct.ok() and not plain_short.ok()
    lines = format_table([good, slow, unshaped, direct, plain_short]).splitlines()
    assert lines[2].endswith("ok") and lines[3].endswith("MISS") and lines[4].endswith("ok")
    assert lines[5].endswith("ok") and "receiver/receiver" in lines[5] and lines[6].endswith("MISS")
    assert f"{RTT_ERROR_MS:g} ms" in lines[-2] and "plain ping and tcpdump" in lines[-1]


def test_data_capacity_leaves_out_acks_only_where_they_share_the_bottleneck():
    from testbed.net.fidelity import MEDIUM_ACK_SHARE, data_capacity_mbps
    from testbed.net.topology import topology_from_dict
    cell = topology_from_dict({
        "name": "cell", "hosts": ["h1", "h2", "h3"],
        "switches": [{"name": "ap", "medium": {"bandwidth_mbps": 20}}, "s1"],
        "links": [{"a": "h1", "b": "ap"}, {"a": "h2", "b": "ap"}, {"a": "ap", "b": "s1"},
                  {"a": "h3", "b": "s1", "profile": {"bandwidth_mbps": 5}}]})
    assert math.isclose(data_capacity_mbps(cell, "h1", "h2"), 20 * (1 - MEDIUM_ACK_SHARE))
    assert 0.02 < MEDIUM_ACK_SHARE < 0.022  # one 66 B ACK per two 1514 B frames
    assert data_capacity_mbps(cell, "h1", "h3") == 5  # the bottleneck is h3's own link, not the cell
    line = topology_from_dict({"name": "l", "hosts": ["h1", "h2"], "links": [{"a": "h1", "b": "h2", "profile": {"bandwidth_mbps": 10}}]})
    assert data_capacity_mbps(line, "h1", "h2") == 10
    assert data_capacity_mbps(topology_from_dict({"name": "u", "hosts": ["h1", "h2"], "links": [{"a": "h1", "b": "h2"}]}), "h1", "h2") is None
