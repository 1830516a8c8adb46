"""What the shaper wants from a topology, from a data-only Wiring (pure; no root, no Mininet)."""

from __future__ import annotations

import pytest

from testbed.net.profile import LinkProfile
from testbed.net.shaping import Shaper, Wiring
from testbed.net.tc import FRAME_BYTES, SourceRule
from testbed.net.topology import load_topology, topology_from_dict


def wiring_of(topo, switched: bool = False) -> Wiring:
    """A wiring as the emulation builds it: interface <node>-eth<link>, pid 1000 + host index;
    ``switched``: delays of paths crossing a switch held there (chain TBNET-abcd, queues from 100)."""
    intf = {(i, frm): f"{frm}-eth{i}" for i, lk in enumerate(topo.links) for frm in (lk.a, lk.b)}
    names = topo.host_names
    return Wiring.of(topo, intf, {h: 1000 + k for k, h in enumerate(names)},
                     {h: f"10.0.0.{k + 1}" for k, h in enumerate(names)},
                     {s.name: f"ifb{k}" for k, s in enumerate(topo.switches)},
                     **(dict(chain="TBNET-abcd", bridges="tbabcds+", queue_base=100) if switched else {}))


def shaper(topo, mechanism: str = "htb+nfqueue", switched: bool = False) -> Shaper:
    def no_spawn(ns, argv):
        raise AssertionError(f"nothing is started by what a topology wants ({ns}: {argv})")

    return Shaper(wiring_of(topo, switched), mechanism, no_spawn, {})


def line():
    return topology_from_dict({"name": "l", "hosts": ["h1", "h2"], "switches": ["s1"], "links": [
        {"a": "h1", "b": "s1", "a_to_b": {"bandwidth_mbps": 10, "delay_ms": 5}},
        {"a": "s1", "b": "h2", "a_to_b": {"delay_ms": 20, "loss_pct": 1}}]})


def test_every_link_direction_gets_its_profile_and_the_longest_round_trip_across_it():
    topo = line()
    want = shaper(topo).wanted_egress(topo)
    w = wiring_of(topo)
    assert set(want) == set(w.egress)
    prof, rtt = want[w.link_port(0, "h1")]
    assert prof == LinkProfile(bandwidth_mbps=10, delay_ms=5) and rtt == 25  # h1 -> h2: 5 + 20, back: 0
    assert want[w.link_port(1, "h2")] == (LinkProfile(), 25)
    assert w.link_port(0, "h1").ns == "h1" and w.link_port(0, "s1").ns == ""  # switch ports live in root


def test_a_medium_is_shaped_on_its_ifb_with_the_switch_ports_as_ingress():
    topo = load_topology("shared_medium")
    w = wiring_of(topo)
    want = shaper(topo).wanted_egress(topo)
    ifb = w.medium("cell")
    assert ifb.ns == "" and ifb.dev == "ifb0" and ifb.ingress == tuple(f"cell-eth{i}" for i in range(4))
    prof, rtt = want[ifb]
    assert prof == topo.switch("cell").medium and rtt == 4  # 2 ms each way through the cell


def test_receivers_get_one_rule_per_source_under_nfqueue_only():
    topo = line()
    rules = shaper(topo).wanted_rules(topo)
    (r,) = rules["h2"]  # the two hops composed: 5 + 20 ms, 1 % loss
    assert (r.src_ip, r.queue_num, r.delay_ms, r.jitter_ms) == ("10.0.0.1", 0, 25, 0) and r.loss_pct == pytest.approx(1)
    assert rules["h1"] == [SourceRule("10.0.0.2", 1)]
    assert shaper(topo, "htb+netem").wanted_rules(topo) == {}  # netem does it on the egress


def test_gso_follows_the_narrowest_path_leaving_each_host():
    topo = line()
    assert shaper(topo).wanted_gso(topo) == {"h1": 2 * FRAME_BYTES, "h2": 65_536}


def test_wiring_runs_host_commands_in_their_namespace_and_the_rest_in_root():
    w = wiring_of(line())
    assert w.ns_argv("h2") == ["mnexec", "-a", "1001"]
    assert w.ns_argv("s1") == [] and w.ns_argv("") == []
    assert w.host("h1").devs == ("h1-eth0",) and w.host("h1").ip == "10.0.0.1"


def test_paths_ending_in_a_switch_are_held_there_direct_links_by_their_receiver():
    topo = topology_from_dict({"name": "mixed", "hosts": ["h1", "h2", "h3"], "switches": ["s1"], "links": [
        {"a": "h1", "b": "s1", "a_to_b": {"bandwidth_mbps": 10, "delay_ms": 5}},
        {"a": "s1", "b": "h2", "a_to_b": {"delay_ms": 20, "loss_pct": 1}},
        {"a": "h1", "b": "h3", "profile": {"delay_ms": 3}}, {"a": "h3", "b": "s1"}]})
    sh = shaper(topo, switched=True)
    rules = sh.wanted_rules(topo)
    assert set(rules) == {"", "h1", "h3"}  # h2 receives only through s1: no delay line in h2
    to_h2 = next(r for r in rules[""] if r.src_ip == "10.0.0.1")  # both hops composed, held at s1's port to h2
    assert (to_h2.port, to_h2.queue_num, to_h2.delay_ms) == ("s1-eth1", 100 + 0 * 3 + 1, 25)
    assert to_h2.loss_pct == pytest.approx(1)
    assert sorted(r.port for r in rules[""]) == ["s1-eth0", "s1-eth1", "s1-eth1", "s1-eth3"]  # h1-h3 is direct
    assert rules["h3"] == [SourceRule("10.0.0.1", 0, 3)] and rules["h1"] == [SourceRule("10.0.0.3", 2, 3)]
    assert [sh.delay_point(topo, "h1", d) for d in ("h2", "h3")] == ["switch", "receiver"]
    assert shaper(topo).delay_point(topo, "h1", "h2") == "receiver"  # no chain: the old receive side
    assert shaper(topo, "htb+netem", switched=True).delay_point(topo, "h1", "h2") == "sender"
