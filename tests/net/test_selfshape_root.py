"""Nodes that shape their own links (testbed.net.selfshape), in plain network namespaces.

No Mininet: each test makes named namespaces on a Linux bridge (testbed.net.plainnet, links
unshaped), starts real node servers inside them, sends Shape through the Orchestrator and
measures inside the namespaces with iperf3 and ping, held to the tolerances the Mininet backend
meets (testbed.net.fidelity, which gives their reasons). Then it checks that the node leaves
nothing behind: no qdisc but the default, no iptables rule or chain, no IFB, no delay line or
guard process, GSO size back, after an empty Shape, after Shutdown, after SIGTERM mid-job and
after SIGKILL (the guard), and that a Shape replacing peers removes the old ones.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from testbed.backends.launch import start_node
from testbed.methods.job import JobSpec
from testbed.net.fidelity import GOODPUT_RATIO, RTT_ERROR_MS, goodput_ok, iperf_goodput, ping, rtt_ok
from testbed.net.plainnet import PlainNet, mesh
from testbed.net.probe import probe_node
from testbed.net.selfshape import topology_links
from testbed.node.orchestrator import NodeError, Orchestrator
from testbed.node.records import NodeAddress

pytestmark = pytest.mark.root

PORT = 50051  # every node has its own namespace and address


@pytest.fixture
def net():
    """Three empty namespaces on a bridge; removed with everything in them even if the test fails."""
    with PlainNet(3, prefix="tbss") as n:
        yield n


def start(net: PlainNet, host: str, logs: Path, wrapper: list[str] | None = None) -> NodeAddress:
    """THE way these tests start a node: in ``host``'s namespace, listening on its address (the
    orchestrator reaches it over the bridge, where nothing is shaped towards it)."""
    proc, addr = start_node(f"{net.data_ip(host)}:{PORT}", logs / f"{host}.log", prefix=net.ns_argv(host),
                            shell_wrapper=wrapper)
    net.procs.append(proc)
    return NodeAddress(control=addr, data=addr)


def node_proc(net: PlainNet, host: str):
    return next(p for p in net.procs if f"{net.data_ip(host)}:{PORT}" in p.args)


def shape_profile(orch: Orchestrator, net: PlainNet, hosts: list[str], profile: dict) -> list[float]:
    """Every ordered pair of ``hosts`` gets ``profile`` (what the topology says the links deliver),
    the other ranks of ``orch`` (started in net.hosts' order) nothing."""
    net.topology = mesh(net.hosts, profile)
    links = topology_links(mesh(hosts, profile), {h: net.data_ip(h) for h in hosts})
    ranks = net.hosts[:len(orch.addresses)]
    return orch.shape([links[hosts.index(h)] if h in hosts else {} for h in ranks])


def leftovers(net: PlainNet, host: str) -> list[str]:
    """What a self-shaping node may have left in ``host``'s namespace."""
    left = [ln for ln in net.run(host, ["tc", "qdisc", "show"]).splitlines() if " noqueue " not in ln]
    ipt = net.run(host, ["iptables-legacy-save"]).splitlines()
    left += [ln for ln in ipt if ln.startswith("-A") or (ln.startswith(":") and ln.split()[0][1:]
                                                          not in ("INPUT", "FORWARD", "OUTPUT"))]
    left += [ln for ln in net.run(host, ["ip", "-o", "link", "show"]).splitlines() if "tbself" in ln]
    if "gso_max_size 65536" not in net.run(host, ["ip", "-d", "link", "show", "dev", "eth0"]):
        left.append("eth0's GSO size was not put back")
    left += [f"process {c}" for c in shaping_processes(net, host)]
    return left


def shaping_processes(net: PlainNet, host: str) -> list[str]:
    """Delay lines and guards living in ``host``'s namespace."""
    out = []
    for pid in net.pids(net.netns(host)):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "testbed.net.delayline" in cmd or "testbed.net.selfshape" in cmd:
            out.append(f"{pid}: {cmd}")
    return out


def class_sent(net: PlainNet, host: str) -> int:
    """Bytes the (only) peer class of ``host``'s eth0 has sent (a re-created class starts at 0)."""
    out = net.run(host, ["tc", "-s", "class", "show", "dev", "eth0"])
    return int(re.search(r"Sent (\d+) bytes", out).group(1))


def shaped(net: PlainNet, host: str) -> bool:
    return "htb 1:" in net.run(host, ["tc", "qdisc", "show", "dev", "eth0"])


def wait_gone(proc, timeout_s: float = 20.0) -> None:
    proc.wait(timeout_s)


def assert_clean(net: PlainNet, hosts: list[str], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        left = {h: leftovers(net, h) for h in hosts}
        if not any(left.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not any(left.values()), f"left behind: {left}"


def test_self_shaped_links_deliver_their_profile_and_change_live(net, tmp_path):
    addrs = [start(net, h, tmp_path) for h in ("h1", "h2")]
    with Orchestrator(addrs) as orch:
        applied = shape_profile(orch, net, ["h1", "h2"], {"bandwidth_mbps": 20, "delay_ms": 10})
        mechanism = probe_node().mechanism
        assert orch.shape_mechanisms == [mechanism] * 2 and all(s > 0 for s in applied)
        for src, dst in (("h1", "h2"), ("h2", "h1")):  # each direction shaped once, by both ends
            ratio = iperf_goodput(net, src, dst, seconds=3) / 20
            assert goodput_ok(ratio), f"{src}->{dst}: goodput/configured {ratio:.3f}, allowed {GOODPUT_RATIO}"
        stats = ping(net, "h1", "h2", count=20)
        assert stats.loss_pct == 0 and rtt_ok(stats.mean_ms - 20), \
            f"RTT {stats.mean_ms:.2f} ms (replies {stats.rtts_ms}) for 2 x 10 ms, allowed +/- {RTT_ERROR_MS} ms"
        for h in ("h1", "h2"):
            log = (tmp_path / f"{h}.log").read_text()
            assert f"shape ({mechanism}" in log and "out 20 Mbit/s" in log and "in 10 ms" in log, log

        # live: the classes change in place (their byte counters go on; the same delay line)
        lines_before, sent_before = shaping_processes(net, "h1"), class_sent(net, "h1")
        shape_profile(orch, net, ["h1", "h2"], {"bandwidth_mbps": 50, "delay_ms": 5})
        assert shaping_processes(net, "h1") == lines_before and class_sent(net, "h1") >= sent_before > 0
        assert "rate 50Mbit" in net.run("h1", ["tc", "class", "show", "dev", "eth0"])
        ratio = iperf_goodput(net, "h1", "h2", seconds=3) / 50
        assert goodput_ok(ratio), f"after the change: goodput/configured {ratio:.3f}, allowed {GOODPUT_RATIO}"
        rtt = ping(net, "h1", "h2", count=20).mean_ms
        assert rtt_ok(rtt - 10), f"after the change: RTT {rtt:.2f} ms for 2 x 5 ms"

        assert orch.shape([{}, {}]) and orch.shape_mechanisms == ["none", "none"]
        assert_clean(net, ["h1", "h2"])
        assert all("shape (none" in (tmp_path / f"{h}.log").read_text() for h in ("h1", "h2"))


def test_loss_is_dropped_by_the_receiver(net, tmp_path):
    addrs = [start(net, h, tmp_path) for h in ("h1", "h2")]
    with Orchestrator(addrs) as orch:
        ip1, ip2 = net.data_ip("h1"), net.data_ip("h2")
        from testbed.net.profile import LinkProfile

        orch.shape([{ip2: LinkProfile(loss_pct=20)}, {}])  # h1 -> h2 loses 20 %: h2 drops them
        assert "statistic" in net.run("h2", ["iptables-legacy-save"])
        assert "statistic" not in net.run("h1", ["iptables-legacy-save"])
        loss = ping(net, "h1", "h2", count=400, interval_s=0.005).loss_pct
        assert 10 <= loss <= 30, f"{loss}% of 400 pings lost at 20% configured"


def test_shutdown_removes_what_the_node_installed(net, tmp_path):
    addrs = [start(net, h, tmp_path) for h in ("h1", "h2")]
    orch = Orchestrator(addrs)
    shape_profile(orch, net, ["h1", "h2"], {"bandwidth_mbps": 20, "delay_ms": 10, "loss_pct": 1})
    assert shaped(net, "h1") and shaped(net, "h2") and shaping_processes(net, "h1")
    orch.shutdown("test")
    for h in ("h1", "h2"):
        wait_gone(node_proc(net, h))
    assert_clean(net, ["h1", "h2"])
    assert "shaping removed" in (tmp_path / "h1.log").read_text()


def test_sigterm_mid_job_removes_what_the_node_installed(net, tmp_path):
    addrs = [start(net, h, tmp_path) for h in ("h1", "h2")]
    orch = Orchestrator(addrs, timeout_s=120)
    try:
        shape_profile(orch, net, ["h1", "h2"], {"bandwidth_mbps": 5, "delay_ms": 20})
        # every decoded token is a round trip over a 20 ms link: the inference lasts seconds
        orch.load(JobSpec(model="gpt2-tiny", method="tensor_parallel", world_size=2, tokens=17, generate=200))
        outcome: list = []

        def infer():
            try:
                outcome.append(orch.infer())
            except NodeError as e:
                outcome.append(e)

        t = threading.Thread(target=infer)
        t.start()
        time.sleep(1.5)
        assert t.is_alive() and shaped(net, "h2"), "the inference ended before the node was stopped"
        node_proc(net, "h2").send_signal(signal.SIGTERM)
        wait_gone(node_proc(net, "h2"))
        t.join(60)
        assert isinstance(outcome[0], NodeError)  # the job was cut short
        assert_clean(net, ["h2"])
        wait_gone(node_proc(net, "h1"))  # a failed inference stops every node
        assert_clean(net, ["h1"])
    finally:
        orch.shutdown()


def test_a_node_killed_outright_is_cleaned_up_by_its_guard(net, tmp_path):
    addrs = [start(net, h, tmp_path) for h in ("h1", "h2")]
    with Orchestrator(addrs) as orch:
        shape_profile(orch, net, ["h1", "h2"], {"bandwidth_mbps": 20, "delay_ms": 10})
        assert shaped(net, "h1")
        node = node_proc(net, "h1")
        registry = Path(f"/run/testbed-net/self-{node.pid}.json")
        assert registry.exists()
        node.kill()
        wait_gone(node)
        assert_clean(net, ["h1"], timeout_s=10)
        deadline = time.monotonic() + 5
        while registry.exists() and time.monotonic() < deadline:  # the guard removes it right after
            time.sleep(0.05)
        assert not registry.exists()  # nothing left for `testbed clean` either


def test_a_fresh_shape_replacing_peers_removes_the_old_ones(net, tmp_path):
    addrs = [start(net, h, tmp_path) for h in ("h1", "h2", "h3")]
    ip = {h: net.data_ip(h) for h in net.hosts}
    with Orchestrator(addrs) as orch:
        shape_profile(orch, net, ["h1", "h2"], {"bandwidth_mbps": 20, "delay_ms": 10})
        h1 = net.run("h1", ["tc", "filter", "show", "dev", "eth0"]) + net.run("h1", ["iptables-legacy-save"])
        assert _hex(ip["h2"]) in h1 and ip["h2"] in h1 and ip["h3"] not in h1
        shape_profile(orch, net, ["h1", "h3"], {"bandwidth_mbps": 30, "delay_ms": 5})
        h1 = net.run("h1", ["tc", "filter", "show", "dev", "eth0"]) + net.run("h1", ["iptables-legacy-save"])
        assert _hex(ip["h3"]) in h1 and ip["h3"] in h1 and _hex(ip["h2"]) not in h1 and ip["h2"] not in h1
        assert len(net.run("h1", ["tc", "class", "show", "dev", "eth0"]).splitlines()) == 1
        assert_clean(net, ["h2"])  # h2 has no shaped peer left
        rtt = ping(net, "h1", "h3", count=10).mean_ms
        assert rtt_ok(rtt - 10), f"RTT h1-h3 {rtt:.2f} ms for 2 x 5 ms"
        assert ping(net, "h1", "h2", count=10).mean_ms < 2  # no longer delayed


def test_clean_finds_what_a_node_left_when_it_died_with_its_guard(net, tmp_path):
    from testbed.net import cleanup

    addrs = [start(net, h, tmp_path) for h in ("h1", "h2")]
    with Orchestrator(addrs) as orch:
        shape_profile(orch, net, ["h1", "h2"], {"bandwidth_mbps": 20, "delay_ms": 10})
        node = node_proc(net, "h1")
        guard = [int(line.split(":")[0]) for line in shaping_processes(net, "h1") if "selfshape" in line]
        assert len(guard) == 1
        os.kill(guard[0], signal.SIGKILL)  # both die at once: nobody in the namespace cleans up
        node.kill()
        wait_gone(node)
        time.sleep(0.5)
        assert shaped(net, "h1")
        found = cleanup.find_leftovers()
        assert any(f"self-{node.pid}" in str(p) for p in found.nodes)
        cleanup.clean()
        assert_clean(net, ["h1"])


def _hex(ip: str) -> str:
    """An address as tc's u32 filters print it."""
    return "".join(f"{int(x):02x}" for x in ip.split("."))
