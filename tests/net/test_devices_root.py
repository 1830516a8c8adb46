"""Backend devices on nodes in plain network namespaces (veth + bridge, no Mininet) that shape
themselves, against backend mininet on a mesh with the same profiles: the same outputs and bytes,
and median latencies within 10% (what the product requires of running on devices)."""

from __future__ import annotations

import pytest

from testbed.experiment import api
from testbed.net.plainnet import PlainNet
from testbed.net.topology import DeviceProfile, full_mesh
from tests.backends.devices_nodes import launch_node
from tests.experiment.helpers import tiny

pytestmark = pytest.mark.root

PROFILES = [{"bandwidth_mbps": 20, "delay_ms": 2}, {"bandwidth_mbps": 100, "delay_ms": 2}]
METHODS = ["sequence_parallel", {"name": "astra", "params": {"groups": 1, "codebook_size": 16}}]
TOLERANCE = 0.10


def experiment(**over) -> dict:
    d = tiny(methods=METHODS, nodes={"count": 3}, sweep={"profiles": PROFILES}, repetitions=3, warmup=1,
             timeout_s=120)
    d.pop("topology")
    d.update(over)
    return d


def test_devices_in_namespaces_agree_with_mininet_on_a_mesh(tmp_path):
    nodes = []
    with PlainNet(3, prefix="tbdv") as net:
        try:
            for h in net.hosts:
                nodes.append(launch_node(f"{net.data_ip(h)}:50051", tmp_path / f"{h}.log", prefix=net.ns_argv(h)))
            inv = {"nodes": [{"name": h, "address": n.address} for h, n in zip(net.hosts, nodes)]}
            dev = api.run(experiment(backend="devices", devices=inv), tmp_path / "devices", plots=False)
            for n in nodes:  # the run left them serving
                assert n.alive()
            leftover = net.run(net.hosts[0], ["tc", "qdisc", "show", "dev", "eth0"])
        finally:
            for n in nodes:
                n.stop()
    assert "htb" not in leftover and "netem" not in leftover, leftover  # shaping removed at the end
    mesh = {**full_mesh([DeviceProfile()] * 3).to_dict(), "name": "mesh"}
    mn = api.run(experiment(backend="mininet", topology=mesh, fidelity_s=0, emulation={"time_dilation": 1}),
                 tmp_path / "mininet", plots=False)

    a, b = dev.rows, mn.rows
    assert (a["status"] == "ok").all() and (b["status"] == "ok").all(), (a["error"].tolist(), b["error"].tolist())
    keys = ["bandwidth_mbps", "label", "repetition"]
    a, b = a.sort_values(keys).reset_index(drop=True), b.sort_values(keys).reset_index(drop=True)
    assert a[keys].equals(b[keys])
    for col in ("bytes_sent", "agreement", "max_abs_err"):
        assert a[col].tolist() == b[col].tolist(), col
    med = lambda df: df.groupby(["bandwidth_mbps", "label"])["latency_s"].median()  # noqa: E731
    table = (med(a).rename("devices_s").to_frame().join(med(b).rename("mininet_s")))
    table["ratio"] = table["devices_s"] / table["mininet_s"]
    print(f"\nmedian latency, devices (self-shaped namespaces) vs mininet (mesh), mechanism "
          f"{a['mechanism'].iloc[0]} vs {b['mechanism'].iloc[0]}:\n{table.to_string()}")
    assert ((table["ratio"] - 1).abs() <= TOLERANCE).all(), table
