"""Backend devices: an experiment on node servers its user started, reached by their inventory.

Three real node servers on loopback addresses play the devices (launched as a device's user
launches them). The same tiny experiment runs through `backend: devices` and `backend: loopback`
with the same outputs and bytes; the nodes are never stopped by the run; versions, unreachable
devices and bad inventories are one clear error each; a device that drops fails what it was
running, and the next start names it until it is back.
"""

from __future__ import annotations

import grpc
import pytest
import yaml

from testbed.backends.devices import DevicesBackend
from testbed.backends.inventory import DeviceNode, Inventory
from testbed.errors import CommError, ConfigError
from testbed.experiment import api
from testbed.methods.job import JobSpec
from testbed.node import serde
from testbed.node.host import host_info
from testbed.proto import node_pb2_grpc
from tests.backends.devices_nodes import launch_node
from tests.experiment.helpers import tiny

NAMES = ["pi1", "pi2", "pi3"]
METHODS = ["single", "sequence_parallel", "sequence_parallel_int8", {"name": "astra", "params": {"groups": 1, "codebook_size": 16}}]


@pytest.fixture(scope="module")
def devices(tmp_path_factory):
    """Three node servers (127.0.0.11-13), as three devices' users would start them."""
    logs = tmp_path_factory.mktemp("device-logs")
    from concurrent.futures import ThreadPoolExecutor

    nodes = []
    try:
        with ThreadPoolExecutor(3) as pool:  # each imports torch: seconds
            futures = [pool.submit(launch_node, f"127.0.0.{11 + i}:0", logs / f"{NAMES[i]}.log") for i in range(3)]
            for f in futures:
                try:
                    nodes.append(f.result())
                except Exception:  # noqa: BLE001 - the others are still stopped below
                    pass
        assert len(nodes) == 3, "a node server did not start (see its log)"
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def inventory(nodes, **over) -> dict:
    return {"nodes": [{"name": NAMES[i], "address": n.address} for i, n in enumerate(nodes)],
            "connect_timeout_s": 5, **over}


def stats(address: str):
    with grpc.insecure_channel(address) as ch:
        return serde.read_stats_response(node_pb2_grpc.NodeStub(ch).Stats(serde.stats_request(), timeout=5))


def experiment(**over) -> dict:
    d = tiny(methods=METHODS, nodes={"count": 3}, repetitions=1, warmup=0, timeout_s=60)
    d.pop("topology")
    d.update(over)
    return d


def test_same_rows_as_loopback_and_the_devices_keep_serving(devices, tmp_path):
    inv = tmp_path / "lab.yaml"
    inv.write_text(yaml.safe_dump(inventory(devices)))
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(experiment(backend="devices", devices="lab.yaml")))  # relative to exp.yaml
    on_devices = api.run(api.experiment(exp), tmp_path / "devices", plots=False)
    on_loopback = api.run(experiment(backend="loopback", topology="mesh"), tmp_path / "loopback", plots=False)
    assert on_devices.status == on_loopback.status == "complete"
    a, b = (r.rows.set_index("label") for r in (on_devices, on_loopback))
    assert (a["status"] == "ok").all() and (b["status"] == "ok").all()
    assert sorted(a.index) == sorted(b.index) and len(a) == len(METHODS)
    for col in ("bytes_sent", "bytes_sent_max_rank", "agreement", "max_abs_err", "all_reduce"):
        assert a[col].to_dict() == b[col].to_dict(), col
    assert (a["agreement"] == 1.0).all()
    # the loopback interface carried at least the payload (the devices share lo: counted once)
    assert (a["bytes_on_wire"] >= a["bytes_sent"]).all(), a[["bytes_on_wire", "bytes_sent"]]
    assert b["bytes_on_wire"].isna().all()

    manifest = on_devices.manifest
    nodes = manifest["backend"]["nodes"]
    me = host_info()
    assert [n["name"] for n in nodes] == NAMES and [n["address"] for n in nodes] == [d.address for d in devices]
    for n in nodes:
        assert (n["hostname"], n["kernel"], n["cpu_model"], n["cpu_count"]) == \
            (me["hostname"], me["kernel"], me["cpu_model"], me["cpu_count"])
        assert n["data_interface"] == "lo"
    assert manifest["backend"]["name"] == "devices" and manifest["config"]["devices"]["nodes"][1]["name"] == "pi2"
    assert on_devices.spec.devices.names == NAMES  # the manifest's config reads back

    for d in devices:  # still serving, jobless: the run unloaded them and stopped none
        assert d.alive()
        s = stats(d.address)
        assert s.job_id == "" and s.rank == -1


def test_codebooks_travel_inline_and_no_file_is_left(devices, tmp_path):
    """A job whose codebook path no node can open builds from the bytes sent along, the same as from
    the file; the nodes leave no copy behind."""
    import tempfile
    from pathlib import Path

    import torch

    from testbed.methods.vq import fit_codebooks, save_codebooks
    from testbed.models import build_model
    from testbed.node.orchestrator import Orchestrator
    from testbed.node.records import NodeAddress

    path = tmp_path / "cb.pt"
    save_codebooks(path, fit_codebooks(build_model("vit-tiny", seed=0), 1, 16, 17, seed=0))
    job = JobSpec(model="vit-tiny", method="astra", world_size=3, tokens=17,
                  params={"groups": 1, "codebook_size": 16}, codebook_path=str(path))
    before = set(Path(tempfile.gettempdir()).glob("testbed-codebooks-*"))
    with Orchestrator([NodeAddress(d.address, d.address) for d in devices], owns_nodes=False) as orch:
        orch.load(job)
        from_file = orch.infer().output
        orch.load(JobSpec(**{**job.to_dict(), "codebook_path": "/nonexistent/cb.pt"}), codebooks=path.read_bytes())
        inline = orch.infer().output
    assert from_file is not None and torch.equal(from_file, inline)
    assert set(Path(tempfile.gettempdir()).glob("testbed-codebooks-*")) == before
    assert all(d.alive() for d in devices)


def test_version_mismatch_is_refused_naming_the_device(devices, tmp_path, monkeypatch):
    """The nodes report this checkout's versions; a runner of another package version refuses them."""
    from testbed.backends import devices as D
    from testbed.node.host import package_version

    monkeypatch.setattr(D, "expected_versions", lambda: ("9.9.9-runner", D.PROTOCOL_VERSION))
    with pytest.raises(ConfigError) as e:
        api.run(experiment(backend="devices", devices=inventory(devices), methods=["single"]), tmp_path / "out",
                plots=False)
    msg = str(e.value)
    assert msg.startswith(f"devices.nodes[0] (pi1 at {devices[0].address}): got 'testbed {package_version()}, "
                          f"protocol {D.PROTOCOL_VERSION}'; allowed: testbed 9.9.9-runner, protocol "
                          f"{D.PROTOCOL_VERSION}"), msg
    assert all(d.alive() and stats(d.address).job_id == "" for d in devices)
    monkeypatch.setattr(D, "expected_versions", lambda: (package_version(), D.PROTOCOL_VERSION + 1))
    with pytest.raises(ConfigError, match=rf"pi1 .*protocol {D.PROTOCOL_VERSION}'; allowed: .*protocol "
                                          rf"{D.PROTOCOL_VERSION + 1}"):
        D.DevicesBackend(Inventory(tuple(DeviceNode(NAMES[i], d.address) for i, d in enumerate(devices)))).start(3)


def test_an_unreachable_device_is_one_clear_error(devices, tmp_path):
    inv = inventory(devices, connect_timeout_s=1)
    inv["nodes"][1]["address"] = "127.0.0.15:9"  # nothing listens there
    with pytest.raises(CommError) as e:
        api.run(experiment(backend="devices", devices=inv, methods=["single"]), tmp_path / "out", plots=False)
    msg = str(e.value)
    assert msg.startswith("device 'pi2' (127.0.0.15:9) cannot be reached within 1 s"), msg
    assert "\n" not in msg


# --------------------------------------------------------------------------- the spec
GOOD_NODES = [{"name": "a", "address": "10.0.0.1:50051"}, {"name": "b", "address": "b.local:50051"},
              {"name": "c.3", "address": "[fe80::1]:50051", "device": {"speed": 0.5, "threads": 4}}]


def spec_error(tmp_path, **over) -> ConfigError:
    out = tmp_path / "never"
    with pytest.raises(ConfigError) as e:
        api.run(experiment(**over), out)
    assert not out.exists()  # nothing written
    return e.value


@pytest.mark.parametrize("over, field", [
    ({"backend": "devices"}, "devices"),
    ({"backend": "mininet", "topology": "mesh", "devices": {"nodes": GOOD_NODES}}, "devices"),
    ({"backend": "loopback", "topology": "mesh", "devices": {"nodes": GOOD_NODES}}, "devices"),
    ({"backend": "devices", "devices": {"nodes": GOOD_NODES}, "topology": "star"}, "topology"),
    ({"backend": "devices", "devices": {"nodes": [GOOD_NODES[0], {**GOOD_NODES[1], "name": "a"}, GOOD_NODES[2]]}},
     "devices.nodes[1].name"),
    ({"backend": "devices", "devices": {"nodes": [GOOD_NODES[0], {**GOOD_NODES[1], "address": "b.local"},
                                                  GOOD_NODES[2]]}}, "devices.nodes[1].address"),
    ({"backend": "devices", "devices": {"nodes": [GOOD_NODES[0], {**GOOD_NODES[1], "address": "b:0"},
                                                  GOOD_NODES[2]]}}, "devices.nodes[1].address"),
    ({"backend": "devices", "devices": {"nodes": [GOOD_NODES[0], {**GOOD_NODES[1], "name": "b c"},
                                                  GOOD_NODES[2]]}}, "devices.nodes[1].name"),
    ({"backend": "devices", "devices": {"nodes": GOOD_NODES[:2]}}, "devices.nodes"),
    ({"backend": "devices", "devices": {"nodes": GOOD_NODES, "tls": "no-such-dir"}}, "devices.tls"),
    ({"backend": "devices", "devices": {"nodes": GOOD_NODES, "connect_timeout_s": 0}}, "devices.connect_timeout_s"),
    ({"backend": "devices", "devices": {"nodes": [GOOD_NODES[0], {**GOOD_NODES[1], "device": {"speed": 0}},
                                                  GOOD_NODES[2]]}}, "devices.nodes[1].device.speed"),
    ({"backend": "devices", "devices": {"nodes": GOOD_NODES, "colour": 1}}, "devices.colour"),
    ({"backend": "devices", "devices": "no-such-inventory.yaml"}, "devices"),
])
def test_spec_errors_are_one_clear_error_with_nothing_written(tmp_path, over, field):
    assert spec_error(tmp_path, **over).field == field


def test_inventory_file_paths_start_at_the_file(tmp_path):
    lab = tmp_path / "lab"
    (lab / "certs").mkdir(parents=True)
    (lab / "inv.yaml").write_text(yaml.safe_dump({"nodes": GOOD_NODES, "tls": "certs"}))
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(experiment(backend="devices", devices="lab/inv.yaml")))
    spec = api.experiment(exp)
    assert spec.topology == "mesh" and spec.devices.tls == str(lab / "certs")
    assert spec.devices.nodes[2].device.threads == 4 and spec.devices.source == str(lab / "inv.yaml")
    assert api.experiment(spec.to_dict()) == spec  # the manifest's inline form reads back the same
    (lab / "inv.yaml").write_text(yaml.safe_dump({"nodes": [GOOD_NODES[0], GOOD_NODES[0], GOOD_NODES[2]]}))
    with pytest.raises(ConfigError) as e:
        api.experiment(exp)
    assert e.value.field == "inv.yaml.nodes[1].name"


def test_a_run_goes_on_when_a_device_drops(devices, tmp_path, monkeypatch):
    """pi3 drops during the first unit's second repetition and is still gone when the second unit
    starts; it is back for the third. Each failure is that unit's rows, naming the device."""
    holder = {"node": launch_node("127.0.0.17:0", tmp_path / "pi3.log")}
    port = holder["node"].address.rsplit(":", 1)[1]
    calls = {"infer": 0, "start": 0}
    infer, start_nodes = DevicesBackend.infer, DevicesBackend.start_nodes

    def dropping_infer(self, repetition=None):
        calls["infer"] += 1
        if calls["infer"] == 2:
            holder["node"].stop()  # the device goes away
        return infer(self, repetition)

    def returning_start(self, n):
        calls["start"] += 1
        if calls["start"] == 3:  # its user starts it again
            holder["node"] = launch_node(f"127.0.0.17:{port}", tmp_path / "pi3.log")
        return start_nodes(self, n)

    monkeypatch.setattr(DevicesBackend, "infer", dropping_infer)
    monkeypatch.setattr(DevicesBackend, "start_nodes", returning_start)
    inv = inventory(devices[:2], connect_timeout_s=1)
    inv["nodes"].append({"name": "pi3", "address": f"127.0.0.17:{port}"})
    try:
        run = api.run(experiment(backend="devices", devices=inv, repetitions=2,
                                 methods=["single", "sequence_parallel", "sequence_parallel_int8"]),
                      tmp_path / "out", plots=False)
        rows = run.rows.sort_values(["cell", "repetition"])
        status = dict(zip(zip(rows["label"], rows["repetition"]), rows["status"]))
        errors = dict(zip(zip(rows["label"], rows["repetition"]), rows["error"]))
        assert status == {("single", 0): "ok", ("single", 1): "error", ("sequence_parallel", 0): "error",
                          ("sequence_parallel", 1): "error", ("sequence_parallel_int8", 0): "ok",
                          ("sequence_parallel_int8", 1): "ok"}, errors
        assert "device 'pi3'" in errors[("single", 1)], errors
        assert f"device 'pi3' (127.0.0.17:{port}) cannot be reached" in errors[("sequence_parallel", 0)], errors
        assert run.manifest["backend"]["starts"] == 2  # the failed start is no start
        assert all(d.alive() and stats(d.address).job_id == "" for d in devices[:2])
    finally:
        holder["node"].stop()


def test_devices_over_mutual_tls_with_allowed_dirs(tmp_path):
    """Devices started as on a real network (--tls-dir, --allow-dir): the run talks mutual TLS to
    them (inventory `tls`), the peers too, ASTRA's codebooks travel inline (the devices may read no
    file of the orchestrator's), and the rows equal the plain run's."""
    from testbed.comm.tls import make_certs

    certs = tmp_path / "certs"
    make_certs(certs)
    models = tmp_path / "models"
    models.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    nodes = []
    try:
        for i in range(3):
            nodes.append(launch_node(f"127.0.0.{14 + i}:0", logs / f"{NAMES[i]}.log",
                                     args=["--tls-dir", str(certs), "--allow-dir", str(models)]))
        run = api.run(experiment(backend="devices", devices=inventory(nodes, tls=str(certs))), tmp_path / "run",
                      plots=False)
        plain = api.run(experiment(backend="loopback", topology="mesh"), tmp_path / "plain", plots=False)
        assert run.status == "complete"
        a, b = (r.rows.set_index("label") for r in (run, plain))
        assert (a["status"] == "ok").all(), a[["status"]]
        for col in ("bytes_sent", "agreement", "max_abs_err"):
            assert a[col].to_dict() == b[col].to_dict(), col
        with pytest.raises(grpc.RpcError) as info:  # a plain client is refused by the TLS handshake
            stats(nodes[0].address)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert all(n.alive() for n in nodes)
    finally:
        for n in nodes:
            n.stop()
