"""Backend devices on nodes in plain network namespaces (veth + bridge, no Mininet) that shape
themselves, against backend mininet on a mesh with the same profiles: the same outputs and bytes,
and median latencies that agree: the median, over the sweep's configurations, of devices' median
latency over Mininet's, both measured in interleaved rounds (the host's load drifts alike for both).

How closely they agree is bounded by how reproducible such a ratio is on this 2-core host at time
dilation 1: six runs measured 0.88-1.18 with three nodes (contending for two cores; three of the six
outside 10%), eight runs 0.95-1.12 with two (sigma ~5%). So two nodes, four rounds, and a tolerance
of 18%, over three sigma: run-to-run noise does not fail the suite, a larger disagreement between the
two backends does.

The namespaced nodes get the CPU confinement Mininet gives its devices at time dilation 1 (one
core's quota each, pinned as Mininet pins them): unconfined, they share this host's cores with
everything else and measured 1.1-1.6x Mininet's latency even unshaped. What a node starts to shape
its links (its delay line, its guard) is moved back out of that confinement as soon as it appears:
holding packets is the network's work, not the device's, and Mininet's delay lines run outside
the devices' cgroups too (left inside, they cost the namespaced nodes ~12% of latency)."""

from __future__ import annotations

import threading

import pandas as pd
import pytest

from testbed.experiment import api
from testbed.net.cgroups import CGROUP_ROOT, DeviceCgroup, allocate_cores, cgroup_v2, host_cpus
from testbed.net.plainnet import PlainNet
from testbed.net.topology import DeviceProfile, full_mesh
from tests.backends.devices_nodes import launch_node
from tests.experiment.helpers import tiny

pytestmark = pytest.mark.root

PROFILES = [{"bandwidth_mbps": 20, "delay_ms": 2}, {"bandwidth_mbps": 100, "delay_ms": 2}]
METHODS = ["sequence_parallel", {"name": "astra", "params": {"groups": 1, "codebook_size": 16}}]
TOLERANCE = 0.18
ROUNDS, REPETITIONS = 4, 3
NODES = 2


def experiment(**over) -> dict:
    d = tiny(methods=METHODS, nodes={"count": NODES}, sweep={"profiles": PROFILES}, repetitions=REPETITIONS, warmup=3,
             timeout_s=120)
    d.pop("topology")
    d.update(over)
    return d


def _release_helpers(cgroups: list, keep: list, stop: threading.Event) -> None:
    """Until ``stop``: every process in the device cgroups but the node servers (``keep``) goes
    back to the host's root cgroups."""
    roots = [CGROUP_ROOT] if cgroup_v2() else [CGROUP_ROOT / c for c in ("cpu", "cpuset", "memory")]
    while not stop.wait(0.02):
        for cg in cgroups:
            try:
                pids = {int(x) for x in (cg.dirs[0] / "cgroup.procs").read_text().split()}
            except (OSError, IndexError, ValueError):
                continue
            for pid in pids - set(keep):
                for root in roots:
                    try:
                        (root / "cgroup.procs").write_text(str(pid))
                    except OSError:
                        pass  # gone already


def test_devices_in_namespaces_agree_with_mininet_on_a_mesh(tmp_path):
    nodes, cgroups, dev, mn = [], [], [], []
    # each node confined as Mininet confines a device of speed 1 and one thread (time dilation 1):
    # one core's worth of CPU, pinned, so neither side has the other's share of this host's cores
    device = DeviceProfile(1.0, 1)
    cores = allocate_cores([device] * NODES, host_cpus())
    mesh = {**full_mesh([DeviceProfile()] * NODES).to_dict(), "name": "mesh"}
    with PlainNet(NODES, prefix="tbdv") as net:
        try:
            for i, h in enumerate(net.hosts):
                nodes.append(launch_node(f"{net.data_ip(h)}:50051", tmp_path / f"{h}.log", prefix=net.ns_argv(h)))
                cgroups.append(DeviceCgroup(f"{net.prefix}-{h}", device, cores[i]))
                cgroups[-1].create()
                cgroups[-1].join(nodes[-1].proc.pid)
            stop = threading.Event()
            mover = threading.Thread(target=_release_helpers, args=(cgroups, [n.proc.pid for n in nodes], stop),
                                     daemon=True)
            mover.start()
            inv = {"nodes": [{"name": h, "address": n.address} for h, n in zip(net.hosts, nodes)]}
            for k in range(ROUNDS):  # interleaved, so that the host's load drifts alike for both
                dev.append(api.run(experiment(backend="devices", devices=inv), tmp_path / f"devices{k}", plots=False))
                leftover = net.run(net.hosts[0], ["tc", "qdisc", "show", "dev", "eth0"])
                assert "htb" not in leftover and "netem" not in leftover, leftover  # shaping removed at the end
                assert all(n.alive() for n in nodes)  # and the nodes left serving
                mn.append(api.run(experiment(backend="mininet", topology=mesh, fidelity_s=0,
                                             emulation={"time_dilation": 1}), tmp_path / f"mininet{k}", plots=False))
        finally:
            if "stop" in locals():
                stop.set()
                mover.join()
            for n in nodes:
                n.stop()
            for cg in cgroups:
                cg.remove()

    a, b = (pd.concat([r.rows.assign(round=k) for k, r in enumerate(runs)], ignore_index=True) for runs in (dev, mn))
    assert (a["status"] == "ok").all() and (b["status"] == "ok").all(), (a["error"].tolist(), b["error"].tolist())
    keys = ["round", "bandwidth_mbps", "label", "repetition"]
    a, b = a.sort_values(keys).reset_index(drop=True), b.sort_values(keys).reset_index(drop=True)
    assert a[keys].equals(b[keys])
    for col in ("bytes_sent", "agreement", "max_abs_err"):
        assert a[col].tolist() == b[col].tolist(), col
    # the devices' eth0 counters: the payload and its framing, and the control plane (Mininet's are data only)
    assert (a["bytes_on_wire"] >= b["bytes_on_wire"]).all(), (a["bytes_on_wire"].tolist(), b["bytes_on_wire"].tolist())
    med = lambda df: df.groupby(["bandwidth_mbps", "label"], dropna=False)["latency_s"].median()  # noqa: E731
    table = med(a).rename("devices_s").to_frame().join(med(b).rename("mininet_s"))
    table["ratio"] = table["devices_s"] / table["mininet_s"]
    overall = float(table["ratio"].median())
    print(f"\nmedian latency over {ROUNDS} interleaved rounds of {REPETITIONS} repetitions, devices "
          f"(self-shaped namespaces, {a['mechanism'].iloc[0]}) vs mininet (mesh, {b['mechanism'].iloc[0]}):\n"
          f"{table.to_string()}\nmedian of the ratios: {overall:.3f} (tolerance {TOLERANCE:.0%})")
    assert abs(overall - 1) <= TOLERANCE, table
