"""LinkProfile -> tc / iptables command lines (pure; no root)."""

from __future__ import annotations

import pytest

from testbed.errors import ConfigError
from testbed.net.profile import LinkProfile
from testbed.net.tc import (FRAME_BYTES, SourceRule, burst_bytes, delayline_config, egress_commands, gso_max_bytes,
                            medium_commands, quantum_bytes, queue_limit_bytes, receiver_rules,
                            switch_rules)


def opt(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


@pytest.mark.parametrize("mbps", [1, 10, 200, 1000, 10_000])
def test_burst_and_quantum_grow_with_the_rate(mbps):
    cmds = egress_commands("eth0", LinkProfile(bandwidth_mbps=mbps), "htb+nfqueue")
    cls = next(c for c in cmds if c[1] == "class")
    assert opt(cls, "rate") == f"{mbps * 1_000_000}bit"
    burst = int(opt(cls, "burst"))
    assert burst == int(opt(cls, "cburst")) == burst_bytes(mbps)
    assert burst >= max(2 * FRAME_BYTES, mbps * 1e6 / 8 / 1000)  # >= 1 ms at the rate (no fixed 15 KB)
    assert FRAME_BYTES <= int(opt(cls, "quantum")) == quantum_bytes(mbps) <= 200_000


def test_htb_layout_and_bdp_sized_queue():
    prof = LinkProfile(bandwidth_mbps=100, delay_ms=20)
    cmds = egress_commands("h1-eth0", prof, "htb+nfqueue", rtt_ms=80)
    assert [c[:4] for c in cmds] == [["tc", "qdisc", "add", "dev"], ["tc", "class", "add", "dev"],
                                     ["tc", "qdisc", "add", "dev"]]
    assert "default" in cmds[0] and "bfifo" in cmds[2]
    assert int(opt(cmds[2], "limit")) == 100e6 / 8 * 0.080  # the bandwidth-delay product
    assert not any("netem" in c for c in cmds)  # delay is the delay line's job under nfqueue


def test_queue_floor_and_explicit_queue():
    one_gso_packet = 65536 + 2 * FRAME_BYTES  # smaller queues drop every TCP super-packet (a stall)
    assert queue_limit_bytes(LinkProfile(bandwidth_mbps=1)) == one_gso_packet
    assert queue_limit_bytes(LinkProfile(bandwidth_mbps=1000)) == 1000e6 / 8 * 0.020
    assert queue_limit_bytes(LinkProfile(bandwidth_mbps=10, queue_packets=50), rtt_ms=500) == 50 * FRAME_BYTES
    assert queue_limit_bytes(LinkProfile(bandwidth_mbps=10, queue_packets=2)) == one_gso_packet


@pytest.mark.parametrize("mbps, gso", [(None, 65536), (10_000, 65536), (100, 12500), (10, 2 * FRAME_BYTES)])
def test_gso_packets_shrink_with_the_narrowest_path(mbps, gso):
    assert gso_max_bytes(mbps) == gso


def test_change_in_place_when_the_layout_stays():
    old, new = LinkProfile(bandwidth_mbps=10), LinkProfile(bandwidth_mbps=50, delay_ms=5)
    cmds = egress_commands("x", new, "htb+nfqueue", old=old)
    assert [c[1:3] for c in cmds] == [["class", "change"], ["qdisc", "change"]]
    assert opt(cmds[0], "rate") == "50000000bit"


def test_shaped_to_unshaped_and_back_replaces_the_root():
    assert egress_commands("x", LinkProfile(), "htb+nfqueue", old=LinkProfile(bandwidth_mbps=10)) == [
        ["tc", "qdisc", "del", "dev", "x", "root"]]
    assert egress_commands("x", LinkProfile(), "htb+nfqueue") == []
    up = egress_commands("x", LinkProfile(bandwidth_mbps=5), "htb+nfqueue", old=LinkProfile(delay_ms=3))
    assert [c[2] for c in up] == ["add", "add", "add"]


def test_netem_mechanism_puts_delay_jitter_loss_under_htb():
    prof = LinkProfile(bandwidth_mbps=100, delay_ms=10, jitter_ms=2, loss_pct=1.5)
    leaf = egress_commands("x", prof, "htb+netem")[-1]
    assert leaf[leaf.index("10:") + 1:leaf.index("10:") + 2] == ["netem"]
    assert opt(leaf, "delay") == "10000us" and leaf[leaf.index("delay") + 2] == "2000us"
    assert opt(leaf, "loss") == "1.500000%" and int(opt(leaf, "limit")) >= 1000
    root = egress_commands("x", LinkProfile(delay_ms=10), "htb+netem")
    assert len(root) == 1 and root[0][5:9] == ["root", "handle", "1:", "netem"] and opt(root[0], "delay") == "10000us"
    assert egress_commands("x", LinkProfile(delay_ms=4), "htb+netem", old=LinkProfile(delay_ms=10))[0][2] == "change"


def test_unknown_mechanism_is_refused():
    with pytest.raises(ConfigError) as e:
        egress_commands("x", LinkProfile(), "tbf")
    assert e.value.field == "mechanism"


def test_medium_redirects_every_port_to_one_ifb():
    cmds = medium_commands("tbabcm0", ["p1", "p2"])
    assert sum("ingress" in c for c in cmds) == 2
    assert all(c[-1] == "tbabcm0" for c in cmds if c[1] == "filter")


def test_receiver_rules_drop_before_queueing_and_skip_undelayed_sources():
    rules = [SourceRule("10.0.0.2", 1, delay_ms=10, loss_pct=5), SourceRule("10.0.0.3", 2),
             SourceRule("10.0.0.4", 3, loss_pct=1)]
    text = receiver_rules(rules, first=True)
    lines = text.splitlines()
    assert lines[:3] == ["*filter", ":TBNET - [0:0]", "-A INPUT -j TBNET"] and lines[-1] == "COMMIT"
    assert lines[3] == ("-A TBNET -s 10.0.0.2/32 -m statistic --mode random --probability 0.0500000000 -j DROP")
    assert lines[4] == "-A TBNET -s 10.0.0.2/32 -j NFQUEUE --queue-num 1"
    assert "10.0.0.3" not in text and "--probability 0.0100000000" in lines[5]
    assert "-A INPUT" not in receiver_rules(rules)  # later updates only swap the chain's content
    assert delayline_config(rules)["1"] == {"delay_ms": 10, "jitter_ms": 0.0}


def test_switch_rules_match_the_receivers_port_hook_forward_once_and_accept_the_rest():
    rules = [SourceRule("10.0.0.1", 7, delay_ms=10, loss_pct=5, port="tbabcs0-eth2"), SourceRule("10.0.0.3", 8)]
    lines = switch_rules("TBNET-abcd", "tbabcds+", rules, first=True).splitlines()
    assert lines[:3] == ["*filter", ":TBNET-abcd - [0:0]",
                         "-I FORWARD -i tbabcds+ -m physdev --physdev-is-bridged -j TBNET-abcd"]
    match = "-s 10.0.0.1/32 -m physdev --physdev-out tbabcs0-eth2"
    assert lines[3] == f"-A TBNET-abcd {match} -m statistic --mode random --probability 0.0500000000 -j DROP"
    assert lines[4] == f"-A TBNET-abcd {match} -j NFQUEUE --queue-num 7"
    assert lines[5:] == ["-A TBNET-abcd -j ACCEPT", "COMMIT"]  # 10.0.0.3's path: neither lost nor delayed
    assert "FORWARD" not in switch_rules("TBNET-abcd", "tbabcds+", rules)  # live changes swap the chain only
