"""Every built-in topology builds in Mininet, connects every pair, and shapes what it promises."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from testbed.net.cgroups import cgroup_v2, cpu_quota
from testbed.net.cleanup import find_leftovers
from testbed.net.emulation import Emulation
from testbed.net.fidelity import IPERF_PORT, data_capacity_mbps, goodput_ok, iperf_goodput, start_iperf_server
from testbed.net.topology import load_topology, topology_from_dict

pytestmark = pytest.mark.root


@pytest.mark.parametrize("name", ["star", "mesh", "line", "shared_medium", "edge_cloud"])
def test_topology_builds_connects_and_leaves_nothing(name):
    topo = load_topology(name)
    with Emulation(topo) as em:
        run_id = em.run.run_id
        assert not find_leftovers(run_id).empty()  # it really built something, named as clean expects
        hosts = topo.host_names
        for src in hosts:
            for dst in hosts:
                if src != dst:
                    out = em.node(src).cmd(f"ping -n -c 1 -W 3 {em.data_ip(dst)}")
                    assert " 0% packet loss" in out, f"{src} -> {dst}: {out}"
        for h in hosts:  # the root namespace reaches every host over the unshaped control network
            p = subprocess.run(["ping", "-n", "-c", "1", "-W", "3", em.control_ip(h)], capture_output=True, text=True)
            assert p.returncode == 0, p.stdout
    assert find_leftovers(run_id).empty()


def _goodput_at_once(em, pairs: list[tuple[str, str]], seconds: float = 3.0) -> dict[str, float]:
    """TCP goodput (Mbit/s) of several flows run at the same time, by source host."""
    servers = [start_iperf_server(em, dst) for _src, dst in pairs]
    results: dict[str, float] = {}

    def client(src: str, dst: str) -> None:
        out = subprocess.run(em.ns_argv(src) + ["iperf3", "-c", em.data_ip(dst), "-p", str(IPERF_PORT),
                                                "-t", str(seconds), "-O", "1", "-J"], capture_output=True, text=True)
        results[src] = json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6

    threads = [threading.Thread(target=client, args=p) for p in pairs]
    try:
        [t.start() for t in threads]
        [t.join(seconds + 30) for t in threads]
    finally:
        for s in servers:
            s.kill()
            s.wait()
            s.stdout.close()
    return results


def test_shared_medium_is_one_bottleneck_for_all_pairs():
    topo = topology_from_dict({
        "name": "cell", "hosts": ["h1", "h2", "h3", "h4"],
        "switches": [{"name": "ap", "medium": {"bandwidth_mbps": 20}}],
        "links": [{"a": h, "b": "ap"} for h in ("h1", "h2", "h3", "h4")]})
    with Emulation(topo) as em:
        alone = iperf_goodput(em, "h1", "h2")
        # two disjoint pairs at once: on separate links each would get 20; in one cell they share 20
        both = _goodput_at_once(em, [("h1", "h2"), ("h3", "h4")])
    capacity = data_capacity_mbps(topo, "h1", "h2")  # 20 Mbit/s less the flow's ACKs in the same cell
    assert goodput_ok(alone / capacity), alone  # one flow alone fills the cell like any link
    total = both["h1"] + both["h3"]
    assert 0.85 * 20 <= total <= 20.5, f"two flows in one 20 Mbit/s cell got {both}"


def test_device_profile_confines_node_processes_not_the_delay_line():
    topo = load_topology("edge_cloud")  # e1..e3: speed 0.5 (half a core of this host)
    with Emulation(topo) as em:
        cg = em.cgroups["e1"]
        quota, period = cg.cpu_limit()
        assert (quota, period) == cpu_quota(topo.hosts[0].device) and quota / period == 0.5
        assert "server" not in em.cgroups  # no device profile, no cgroup
        app = em.popen("e1", ["sleep", "30"])
        try:
            assert em.internal("e1") in Path(f"/proc/{app.pid}/cgroup").read_text()
            if em.mechanism == "htb+nfqueue":  # the network's own machinery must not slow down with the device
                assert list(em.delay_lines) == [""]  # edge_cloud's paths all end in a switch: held in root
                for dl in em.delay_lines.values():
                    assert em.internal("e1") not in Path(f"/proc/{dl.proc.pid}/cgroup").read_text()
        finally:
            app.kill()
            app.wait()


def test_device_memory_limit_and_cores():
    topo = topology_from_dict({"name": "dev", "links": [{"a": "h1", "b": "h2"}], "hosts": [
        {"name": "h1", "device": {"threads": 1, "memory_mb": 256}}, "h2"]})
    with Emulation(topo) as em:
        cg = em.cgroups["h1"]
        if cgroup_v2():
            assert cg.dirs[0].joinpath("memory.max").read_text().strip() == str(256 << 20)
            cpus = cg.dirs[0].joinpath("cpuset.cpus").read_text().strip()
        else:
            _cpu, cpuset, mem = cg.dirs
            assert int(mem.joinpath("memory.limit_in_bytes").read_text()) == 256 << 20
            cpus = cpuset.joinpath("cpuset.cpus").read_text().strip()
        assert cpus.isdigit()  # exactly one core
        out = em.node("h1").cmd("python3 -c 'import os; print(sorted(os.sched_getaffinity(0)))'")
        assert out.strip() == f"[{cpus}]"
