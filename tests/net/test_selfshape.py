"""Self-shaping nodes without root: the commands they build, the shares they get, and a node
without CAP_NET_ADMIN refusing to shape (testbed.net.selfshape, testbed.net.tc)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from testbed.backends.launch import start_node
from testbed.errors import ConfigError
from testbed.net.probe import has_net_admin
from testbed.net.profile import LinkProfile
from testbed.net.selfshape import (NO_NET_ADMIN, Record, SelfShaper, describe, node_shares, topology_links,
                                   unhook_commands, untc_commands)
from testbed.net.cleanup import dead_node_rules
from testbed.net.tc import (FRAME_BYTES, PeerClass, SourceRule, class_commands, egress_commands,
                            ingress_redirect_commands, peer_commands, queue_limit_bytes, receiver_rules)
from testbed.net.topology import topology_from_dict
from testbed.node import serde
from testbed.node.orchestrator import NodeError, Orchestrator
from testbed.node.records import NodeAddress
from testbed.proto import node_pb2_grpc

STATUS = "Name:\tpython\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t{}\n"


def test_net_admin_is_read_from_the_effective_capabilities():
    assert has_net_admin(STATUS.format("000001ffffffffff"))
    assert not has_net_admin(STATUS.format("000001ffffffefff"))  # root with cap_net_admin dropped
    assert has_net_admin(STATUS.format("0000000000001000"))  # only NET_ADMIN, no root
    assert not has_net_admin("Name:\tx\n")


# -- one profile-to-commands function, two callers ---------------------------------------------

def test_mininet_egress_and_node_peer_classes_come_from_one_function():
    prof = LinkProfile(bandwidth_mbps=20, delay_ms=10)
    link = egress_commands("h1-eth0", prof, "htb+nfqueue", rtt_ms=40)
    assert link[1:] == class_commands("h1-eth0", "add", prof, "bfifo", 40)  # class 1:1, leaf 10:
    peers = peer_commands("eth0", {"10.0.0.2": PeerClass(3, prof, 40)})
    assert peers[1:3] == class_commands("eth0", "add", prof, "bfifo", 40, minor=3)
    assert peers[0][-2:] == ["default", "ffff"]  # other destinations (the orchestrator) pass unshaped
    assert peers[3][peers[3].index("dst") + 1] == "10.0.0.2/32" and peers[3][-1] == "1:3"


def test_peer_classes_change_in_place_and_come_and_go_with_their_peers():
    a, b = LinkProfile(bandwidth_mbps=20), LinkProfile(bandwidth_mbps=50)
    old = {"10.0.0.2": PeerClass(1, a), "10.0.0.3": PeerClass(2, a)}
    assert peer_commands("eth0", dict(old), old) == []  # nothing changed: nothing sent
    cmds = peer_commands("eth0", {"10.0.0.2": PeerClass(1, b), "10.0.0.4": PeerClass(3, a)}, old)
    verbs = [" ".join(c[1:3]) for c in cmds]
    assert verbs == ["filter del", "class del", "class change", "qdisc change", "class add", "qdisc add", "filter add"]
    assert cmds[0][-1] == "2" and cmds[1][-1] == "1:2"  # 10.0.0.3's filter (priority 2) and class go
    assert peer_commands("eth0", {}, old) == [["tc", "qdisc", "del", "dev", "eth0", "root"]]
    assert peer_commands("eth0", {}, {}) == []


def test_received_delay_on_netem_kernels_goes_through_an_ifb():
    prof = LinkProfile(delay_ms=10, jitter_ms=2, loss_pct=1)
    cmds = peer_commands("tbself42", {"10.0.0.2": PeerClass(1, prof)}, match="src", leaf="netem")
    leaf = cmds[2]
    assert "netem" in leaf and leaf[leaf.index("delay") + 1:leaf.index("delay") + 3] == ["10000us", "2000us"]
    assert cmds[3][cmds[3].index("src") + 1] == "10.0.0.2/32"
    red = ingress_redirect_commands("eth0", "tbself42", {"10.0.0.2": 1})
    assert red[0][-1] == "ingress" and red[1][-1] == "tbself42" and "10.0.0.2/32" in red[1]
    assert ingress_redirect_commands("eth0", "tbself42", {}, {"10.0.0.2": 1}) == [
        ["tc", "qdisc", "del", "dev", "eth0", "ingress"]]


def test_a_nodes_chain_is_its_own_goes_first_and_never_blackholes():
    rules = [SourceRule("10.0.0.2", 4097, delay_ms=10, loss_pct=5)]
    lines = receiver_rules(rules, first=True, chain="TBSELF-77", own=True).splitlines()
    assert lines[1:3] == [":TBSELF-77 - [0:0]", "-I INPUT -j TBSELF-77"]
    assert "DROP" in lines[3] and lines[4].endswith("--queue-num 4097 --queue-bypass")
    assert "--queue-bypass" not in receiver_rules(rules)  # Mininet hosts are the testbed's alone


# -- shares --------------------------------------------------------------------------------------

def test_each_node_sends_its_bandwidth_and_holds_what_it_receives():
    hosts = ["10.0.0.1", "10.0.0.2"]
    up = LinkProfile(bandwidth_mbps=10, delay_ms=5, loss_pct=1)
    down = LinkProfile(bandwidth_mbps=40, delay_ms=20, jitter_ms=2)
    s1, s2 = node_shares([{"10.0.0.2": up}, {"10.0.0.1": down}], hosts)
    assert s1["10.0.0.2"].bandwidth_mbps == 10 and s1["10.0.0.2"].delay_ms == 20 and s1["10.0.0.2"].jitter_ms == 2
    assert s2["10.0.0.1"].bandwidth_mbps == 40 and s2["10.0.0.1"].delay_ms == 5 and s2["10.0.0.1"].loss_pct == 1
    # the queue is the bandwidth-delay product of the whole round trip, as the Mininet shaper sizes it
    assert s1["10.0.0.2"].queue_packets == -(-queue_limit_bytes(up, 25) // FRAME_BYTES)
    s1, s2 = node_shares([{}, {"10.0.0.1": down}], hosts)
    assert s1["10.0.0.2"] == LinkProfile(delay_ms=20, jitter_ms=2)  # rank 0 only holds what it receives
    assert node_shares([{}, {}], hosts) == [{}, {}]


def test_shares_name_the_bad_peer():
    with pytest.raises(ConfigError) as e:
        node_shares([{"10.0.0.9": LinkProfile(delay_ms=1)}, {}], ["10.0.0.1", "10.0.0.2"])
    assert e.value.field == "links_by_rank[0]"
    with pytest.raises(ConfigError):
        node_shares([{"10.0.0.1": LinkProfile()}, {}], ["10.0.0.1", "10.0.0.2"])  # itself


def test_topology_links_are_the_one_way_paths():
    topo = topology_from_dict({"name": "t", "hosts": ["a", "b"], "links": [
        {"a": "a", "b": "b", "a_to_b": {"bandwidth_mbps": 5, "delay_ms": 3}, "b_to_a": {"delay_ms": 7}}]})
    links = topology_links(topo, {"a": "10.0.0.1", "b": "10.0.0.2"})
    assert links == [{"10.0.0.2": LinkProfile(bandwidth_mbps=5, delay_ms=3)}, {"10.0.0.1": LinkProfile(delay_ms=7)}]


def test_shape_messages_round_trip_and_bad_ones_name_the_entry():
    links = {"10.0.0.2": LinkProfile(bandwidth_mbps=20, delay_ms=10, queue_packets=40)}
    assert serde.read_shape_request(serde.shape_request(links)) == links
    from testbed.proto import node_pb2

    bad = node_pb2.ShapeRequest(links=[node_pb2.PeerLink(peer="10.0.0.2", profile_json='{"delay_ms": -1}')])
    with pytest.raises(ConfigError) as e:
        serde.read_shape_request(bad)
    assert e.value.field == "links[0].profile.delay_ms"
    twice = node_pb2.ShapeRequest(links=[node_pb2.PeerLink(peer="10.0.0.2")] * 2)
    with pytest.raises(ConfigError):
        serde.read_shape_request(twice)


def test_a_peer_must_be_an_ipv4_address():
    with pytest.raises(ConfigError) as e:
        SelfShaper(registry_dir=None).shape({"node-2": LinkProfile(delay_ms=1)})
    assert e.value.field == "links.peer"


def test_undo_commands_and_the_log_line():
    rec = Record(chain="TBSELF-9", devs={"eth0": 65536}, ingress=["eth0"], ifb="tbself9")
    assert Record.from_json(rec.to_json()) == rec
    assert [c[2:] for c in unhook_commands(rec)] == [["-D", "INPUT", "-j", "TBSELF-9"], ["-F", "TBSELF-9"],
                                                     ["-X", "TBSELF-9"]]
    assert ["ip", "link", "set", "dev", "eth0", "gso_max_size", "65536"] in untc_commands(rec)
    assert untc_commands(rec)[-1] == ["ip", "link", "del", "tbself9"]
    line = describe({"10.0.0.2": LinkProfile(bandwidth_mbps=20, delay_ms=10, queue_packets=40),
                     "10.0.0.3": LinkProfile()})
    assert line == "10.0.0.2: out 20 Mbit/s queue 40 pkts, in 10 ms; 10.0.0.3: unshaped"


def test_clean_finds_the_chains_of_dead_nodes_only():
    listing = "-P INPUT ACCEPT\n-N TBSELF-111\n-N TBSELF-222b\n-A INPUT -j TBSELF-111\n-A INPUT -j TBSELF-222b\n" \
              "-A TBSELF-111 -s 10.0.0.2/32 -j NFQUEUE --queue-num 5 --queue-bypass\n"
    assert dead_node_rules(listing, alive=lambda pid: pid == 222) == ["-N TBSELF-111", "-A INPUT -j TBSELF-111"]


# -- a node without CAP_NET_ADMIN ----------------------------------------------------------------

def _without_net_admin() -> tuple[list[str] | None, list[str] | None, str | None]:
    """(prefix, shell wrapper, why not) to start a node whose effective set lacks CAP_NET_ADMIN."""
    if not has_net_admin():
        return [], None, None  # this user has none to drop
    if shutil.which("setpriv"):
        probe = subprocess.run(["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", "true"],
                               capture_output=True)
        if probe.returncode == 0:
            return ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin"], None, None
    if shutil.which("capsh"):
        return [], ["capsh", "--drop=cap_net_admin", "--", "-c"], None
    return None, None, "neither setpriv nor capsh can drop CAP_NET_ADMIN here"


@pytest.fixture
def powerless_nodes(tmp_path):
    """Two nodes on loopback (127.0.0.1, 127.0.0.2) without CAP_NET_ADMIN."""
    prefix, wrapper, why = _without_net_admin()
    if why:
        pytest.skip(why)
    procs, addrs = [], []
    try:
        for i in (1, 2):
            proc, addr = start_node(f"127.0.0.{i}:0", tmp_path / f"n{i}.log", prefix=prefix, shell_wrapper=wrapper,
                                    args=["--watch-parent"])
            procs.append(proc)
            addrs.append(NodeAddress(addr, addr))
            status = Path(f"/proc/{proc.pid}/status").read_text()
            assert not has_net_admin(status), "the node kept CAP_NET_ADMIN"
        yield addrs
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def test_shape_without_net_admin_is_refused_and_an_empty_one_accepted(powerless_nodes):
    with grpc.insecure_channel(powerless_nodes[0].control) as ch:
        stub = node_pb2_grpc.NodeStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Shape(serde.shape_request({"127.0.0.2": LinkProfile(bandwidth_mbps=20, delay_ms=10)}), timeout=30)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert e.value.details() == NO_NET_ADMIN
    with Orchestrator(powerless_nodes) as orch:
        with pytest.raises(NodeError) as e:
            orch.shape([{"127.0.0.2": LinkProfile(delay_ms=10)}, {}])
        # rank 1 would hold the delay of what rank 0 sends; rank 0's share is empty, and accepted
        assert e.value.rank == 1 and "FAILED_PRECONDITION" in str(e.value) and NO_NET_ADMIN in str(e.value)
        assert len(orch.stats()) == 2  # a refused shape leaves the nodes running
        orch.shape([{}, {}])
        orch.shape([{"127.0.0.2": LinkProfile()}, {"127.0.0.1": LinkProfile()}])  # all unshaped: nothing to do
        assert orch.shape_mechanisms == ["none", "none"]


def test_the_guard_undoes_nothing_when_told_done(tmp_path):
    p = subprocess.run([os.sys.executable, "-m", "testbed.net.selfshape", "guard"], input=Record(
        chain="TBSELF-1").to_json() + "\ndone\n", capture_output=True, text=True,
                       cwd=str(Path(__file__).resolve().parents[2]))
    assert p.returncode == 0 and p.stderr == ""
