"""bench.interference end to end in a live emulation (root): its three phases measured on a tiny
model, iperf3 flows stopped and nothing of the emulation left behind (its ratios are measurements;
none is asserted here)."""

from __future__ import annotations

import subprocess

import pytest

pytestmark = pytest.mark.root


def test_the_interference_benchmark_measures_every_phase_and_leaves_nothing():
    from testbed.bench.interference import PHASES, interference_table

    rows = interference_table(rounds=1, forwards=2, model="vit-tiny", tokens=17, log=lambda _msg: None)
    assert [r["phase"] for r in rows] == list(PHASES)
    assert all(r["cpu_per_forward_s"] > 0 and r["softirq_cpu_s_per_s"] >= 0 for r in rows)
    assert rows[0]["cpu_over_idle"] == pytest.approx(1.0)
    left = subprocess.run(["pgrep", "-f", "iperf3 -(s|c) .*530[0-9]|testbed.bench.forward_worker"],
                          capture_output=True, text=True).stdout.split()
    assert not left


def test_a_core_kept_for_the_network_holds_the_delay_lines_and_receive_processing_and_no_device():
    """Emulation(network_cpu=c): every delay line runs on c only, every emulated interface (switch ports
    in the root namespace, each host's in its own) steers receive processing to c, no device cgroup
    has c, and the links still carry traffic."""
    import os
    from pathlib import Path

    from testbed.net.cgroups import host_cpus
    from testbed.net.emulation import Emulation
    from testbed.net.profile import LinkProfile
    from testbed.net.topology import DeviceProfile, HostSpec, LinkSpec, SwitchSpec, Topology

    cpus = host_cpus()
    if len(cpus) < 2:
        pytest.skip("needs two cores: one for the network, one for the devices")
    net = cpus[0]
    dev = DeviceProfile(speed=1.0, threads=1).dilated(2.0)
    topo = Topology("netcore", (HostSpec("h1", dev), HostSpec("h2", dev)), (SwitchSpec("s1"),),
                    (LinkSpec("h1", "s1"), LinkSpec("h2", "s1")))
    with Emulation(topo, network_cpu=net) as em:
        em.apply_profile(LinkProfile(50, 2))  # a delay: the delay lines carry every packet
        assert em.delay_lines
        for dl in em.delay_lines.values():
            assert os.sched_getaffinity(dl.proc.pid) == {net}
        assert all(net not in (cg.cores or []) and cg.cores for cg in em.cgroups.values())
        mask = int(f"{1 << net:x}", 16)
        ports = [n for (_, node), n in em._intf.items() if node == "s1"]
        assert len(ports) == 2
        for p in ports:
            assert int(Path(f"/sys/class/net/{p}/queues/rx-0/rps_cpus").read_text().replace(",", ""), 16) == mask
        inside = subprocess.run(["nsenter", "-t", str(em.node("h1").pid), "-n", "--", "unshare", "-m", "sh", "-c",
                                 "mount -t sysfs sysfs /sys && cat /sys/class/net/*/queues/rx-0/rps_cpus"],
                                capture_output=True, text=True, check=True).stdout.split()
        assert inside and all(int(m.replace(",", ""), 16) == mask for m in inside)
        ping = em.popen("h1", ["ping", "-c", "2", "-W", "2", em.data_ip("h2")], device=False)
        assert ping.wait(timeout=20) == 0
