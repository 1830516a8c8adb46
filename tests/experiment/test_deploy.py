"""`testbed deploy kubernetes`: the manifests parse into the official Kubernetes client's models with no
unknown field, the node pods' resources follow the device profile, the sweep Job's command parses
with `testbed run`'s own parser and its experiment with the spec loader. No cluster runs here."""

from __future__ import annotations

import base64
import re

import pytest
import yaml

from testbed.cli import main
from testbed.errors import ConfigError
from testbed.experiment.cli import _run_parser
from testbed.experiment.deploy import CERT_FILES, render_kubernetes, write_kubernetes
from testbed.experiment.shard import Shard, parse_shard
from testbed.experiment.spec import BACKENDS, parse_spec

from .helpers import tiny

kubernetes = pytest.importorskip("kubernetes", reason="the kubernetes client (pyproject dependency) is not installed")
from kubernetes.client import ApiClient  # noqa: E402
import kubernetes.client.models as models  # noqa: E402

MODELS = {"Secret": "V1Secret", "ConfigMap": "V1ConfigMap", "Service": "V1Service", "StatefulSet": "V1StatefulSet",
          "PersistentVolumeClaim": "V1PersistentVolumeClaim", "Job": "V1Job", "Pod": "V1Pod"}
LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component")
# 4 nodes, each a device of 2 cores at half this host's speed with 2 GiB: 1 CPU, 2048Mi per pod
EXP = tiny(name="Sweep_4.nodes", nodes={"count": 4, "threads": 2, "device": {"speed": 0.5}, "memory_mb": 2048},
           backend="mininet", methods=["single", "tensor_parallel", "sequence_parallel"],
           sweep={"bandwidth_mbps": [10, 100]}, repetitions=1)


def unknown_keys(data, type_name: str, path: str = "") -> list[str]:
    """Every key of ``data`` (recursively) that the client's model ``type_name`` does not have. The
    deserializer drops unknown keys silently; this walk compares each mapping with the model's attribute_map."""
    m = re.fullmatch(r"List\[(.+)\]", type_name)
    if m:
        assert isinstance(data, list), f"{path}: a list expected"
        return [k for i, x in enumerate(data) for k in unknown_keys(x, m.group(1), f"{path}[{i}]")]
    m = re.fullmatch(r"Dict\[str, (.+)\]", type_name)
    if m:
        assert isinstance(data, dict), f"{path}: a mapping expected"
        return [k for key, x in data.items() for k in unknown_keys(x, m.group(1), f"{path}.{key}")]
    cls = getattr(models, type_name, None)
    if cls is None or not hasattr(cls, "attribute_map"):
        return []  # str, int, bool, object (int-or-string)
    assert isinstance(data, dict), f"{path}: a mapping expected for {type_name}"
    attr = {v: k for k, v in cls.attribute_map.items()}
    out = []
    for key, x in data.items():
        if key not in attr:
            out.append(f"{path}.{key}".lstrip("."))
        else:
            out += unknown_keys(x, cls.openapi_types[attr[key]], f"{path}.{key}")
    return out


def rendered(tmp_path, **kw) -> dict[str, dict]:
    """file name -> the object as read back from the written YAML."""
    files = render_kubernetes(parse_spec(EXP), namespace="lab", image="registry.example.com/testbed:0.1.0", **kw)
    write_kubernetes(tmp_path, files)
    out = {}
    for name in files:
        docs = list(yaml.safe_load_all((tmp_path / name).read_text()))
        assert len(docs) == 1
        out[name] = docs[0]
    return out


def load(obj: dict):
    return ApiClient()._ApiClient__deserialize(obj, MODELS[obj["kind"]])


def by_kind(objs: dict[str, dict], kind: str) -> list[dict]:
    return [o for o in objs.values() if o["kind"] == kind]


@pytest.mark.parametrize("shards", [None, 3])
def test_manifests_are_valid_kubernetes_objects(tmp_path, shards):
    objs = rendered(tmp_path, shards=shards, anti_affinity=True)
    for name, obj in objs.items():
        assert obj["kind"] in MODELS, name  # namespaced kinds only: nothing needs cluster-admin
        assert unknown_keys(obj, MODELS[obj["kind"]]) == [], name
        model = load(obj)
        assert model.metadata.namespace == "lab" and all(k in model.metadata.labels for k in LABELS), name
        assert model.metadata.labels["app.kubernetes.io/instance"] == "sweep-4-nodes"


def test_node_pods_are_the_devices(tmp_path):
    objs = rendered(tmp_path, anti_affinity=True)
    [sts] = [load(o) for o in by_kind(objs, "StatefulSet")]
    [svc] = [load(o) for o in by_kind(objs, "Service")]
    assert sts.spec.replicas == 4 and sts.spec.service_name == svc.metadata.name == "sweep-4-nodes-nodes"
    assert svc.spec.cluster_ip == "None"
    pod_labels = sts.spec.template.metadata.labels
    assert sts.spec.selector.match_labels.items() <= pod_labels.items() and svc.spec.selector.items() <= pod_labels.items()
    [c] = sts.spec.template.spec.containers
    assert c.resources.limits == {"cpu": "1000m", "memory": "2048Mi"} == c.resources.requests  # 0.5 x 2 cores
    assert c.security_context.capabilities.add == ["NET_ADMIN"] and not c.security_context.privileged
    assert c.security_context.capabilities.drop is None and not c.security_context.allow_privilege_escalation
    assert c.args[:3] == ["node", "--listen", "0.0.0.0:50051"] and c.ports[0].container_port == 50051
    assert c.args[3:] == ["--tls-dir", "/etc/testbed/tls", "--allow-dir", "/models"]
    term = sts.spec.template.spec.affinity.pod_anti_affinity.required_during_scheduling_ignored_during_execution[0]
    assert term.topology_key == "kubernetes.io/hostname" and term.label_selector.match_labels.items() <= pod_labels.items()
    assert rendered(tmp_path / "plain")["03-statefulset-nodes.yaml"]["spec"]["template"]["spec"].get("affinity") is None
    # the nodes mount only their own key pair
    tls = next(v for v in sts.spec.template.spec.volumes if v.name == "tls")
    assert sorted(i.key for i in tls.secret.items) == ["ca.pem", "node.key", "node.pem"]


def test_devices_without_memory_get_a_request_and_no_memory_limit():
    spec = parse_spec(tiny(nodes={"count": 2, "threads": 1}, backend="sim"))
    sts = render_kubernetes(spec)["03-statefulset-nodes.yaml"][1]
    res = sts["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"] == {"cpu": "1000m"} and res["requests"]["cpu"] == "1000m" and "memory" in res["requests"]


def test_different_devices_per_node_are_refused():
    spec = parse_spec(tiny(nodes={"count": 4}, topology="edge_cloud", backend="sim"))  # 3 slow devices, 1 server
    with pytest.raises(ConfigError) as e:
        render_kubernetes(spec)
    assert "the same device on every node" in str(e.value)
    fixed = parse_spec(tiny(nodes={"count": 4, "device": {"speed": 0.5}}, topology="edge_cloud", backend="sim"))
    assert render_kubernetes(fixed)["03-statefulset-nodes.yaml"][1]["spec"]["replicas"] == 4


def sweep_container(objs: dict) -> dict:
    return objs["05-job-sweep.yaml"]["spec"]["template"]["spec"]["containers"][0]


def test_the_sweep_job_runs_testbed_run(tmp_path):
    objs = rendered(tmp_path)
    job = load(objs["05-job-sweep.yaml"])
    assert job.spec.completion_mode is None and job.spec.template.spec.restart_policy == "Never"
    args = sweep_container(objs)["args"]
    assert args[0] == "run"
    ns = _run_parser().parse_args(args[1:])
    assert ns.experiment == "/etc/testbed/experiment.yaml" and ns.out == "/results/sweep-4-nodes/run"
    assert ns.shard is None
    mounts = {m["mountPath"]: m for m in sweep_container(objs)["volumeMounts"]}
    assert mounts["/etc/testbed/experiment.yaml"]["subPath"] == "experiment.yaml" and "/results" in mounts
    vols = {v["name"]: v for v in objs["05-job-sweep.yaml"]["spec"]["template"]["spec"]["volumes"]}
    assert vols["results"]["persistentVolumeClaim"]["claimName"] == objs["04-pvc-results.yaml"]["metadata"]["name"]
    assert sorted(i["key"] for i in vols["tls"]["secret"]["items"]) == ["ca.pem", "orchestrator.key", "orchestrator.pem"]
    assert "after/merge-job.yaml" not in objs and "after/results-pod.yaml" in objs


def test_shards_render_an_indexed_job(tmp_path):
    objs = rendered(tmp_path, shards=3)
    job = load(objs["05-job-sweep.yaml"])
    assert (job.spec.completion_mode, job.spec.completions, job.spec.parallelism) == ("Indexed", 3, 3)
    args = sweep_container(objs)["args"]
    for k in range(3):  # what the kubelet makes of $(JOB_COMPLETION_INDEX) in pod K
        ns = _run_parser().parse_args([a.replace("$(JOB_COMPLETION_INDEX)", str(k)) for a in args[1:]])
        assert parse_shard(ns.shard) == Shard(k, 3) and ns.out == f"/results/sweep-4-nodes/shard-{k}"
    merge = objs["after/merge-job.yaml"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert merge == ["merge", "/results/sweep-4-nodes/run"] + [f"/results/sweep-4-nodes/shard-{k}" for k in range(3)]
    assert objs["04-pvc-results.yaml"]["spec"]["accessModes"] == ["ReadWriteMany"]
    with pytest.raises(ConfigError, match="--shards"):  # 6 units: 7 shards would leave one empty
        render_kubernetes(parse_spec(EXP), shards=7)


def cluster_experiment_of(objs: dict) -> dict:
    return yaml.safe_load(objs["01-configmap-experiment.yaml"]["data"]["experiment.yaml"])


def test_the_configmap_experiment_names_the_node_pods(tmp_path):
    d = cluster_experiment_of(rendered(tmp_path))
    assert d["backend"] == "devices" and d["devices"]["tls"] == "/etc/testbed/tls"
    assert d["devices"]["nodes"] == [
        {"name": f"node-{i}", "address": f"sweep-4-nodes-nodes-{i}.sweep-4-nodes-nodes.lab.svc.cluster.local:50051"}
        for i in range(4)]
    assert "device" not in d["nodes"] and "memory_mb" not in d["nodes"]  # the pods' limits are the devices
    # everything but the devices backend loads with today's loader, as it was
    rest = parse_spec({k: v for k, v in d.items() if k != "devices"} | {"backend": "sim"})
    orig = parse_spec(EXP)
    assert rest.methods == orig.methods and rest.cells() == orig.cells() and rest.nodes.count == 4


def test_the_configmap_experiment_loads_with_the_spec_loader(tmp_path):
    from testbed.comm.tls import make_certs

    exp = cluster_experiment_of(rendered(tmp_path))
    assert exp["devices"]["tls"] == "/etc/testbed/tls"  # where the Job mounts the Secret
    make_certs(tmp_path / "tls")  # the loader checks the directory exists: here it stands in for the mount
    spec = parse_spec({**exp, "devices": {**exp["devices"], "tls": str(tmp_path / "tls")}})
    assert spec.backend == "devices" and spec.nodes.count == 4
    assert [n.address for n in spec.devices.nodes][0].endswith(".svc.cluster.local:50051")


def test_the_node_pods_options_are_testbed_nodes(capsys):
    with pytest.raises(SystemExit):
        main(["node", "--help"])
    text = capsys.readouterr().out
    assert "--listen" in text and "--tls-dir" in text and "--allow-dir" in text


def test_secret_holds_the_certificates(tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    for f in CERT_FILES:
        (certs / f).write_bytes(f"-----BEGIN {f}-----\n".encode())
    secret = rendered(tmp_path / "k", certs=certs)["00-secret-tls.yaml"]
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {
        f: f"-----BEGIN {f}-----\n" for f in CERT_FILES}
    (certs / "node.key").unlink()
    with pytest.raises(ConfigError, match="missing: node.key"):
        render_kubernetes(parse_spec(EXP), certs=certs)


def test_cli_writes_the_files_or_one_error(tmp_path, capsys):
    exp = tmp_path / "e.yaml"
    exp.write_text(yaml.safe_dump(EXP))
    out = tmp_path / "k"
    assert main(["deploy", "kubernetes", str(exp), "--out", str(out), "--namespace", "Bad_NS"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("testbed deploy: error: --namespace: got 'Bad_NS'") and not out.exists()
    assert main(["deploy", "kubernetes", str(exp), "--out", str(out), "--shards", "2"]) == 0
    o = capsys.readouterr()
    assert "testbed certs" in o.err and "kubectl apply -f" in o.out and "kubectl -n default cp" in o.out
    secret = (out / "00-secret-tls.yaml").read_text()
    assert secret.startswith("# EMPTY: no --certs given") and "testbed certs" in secret
    assert all(v == "" for v in yaml.safe_load(secret)["data"].values())
    assert sorted(p.name for p in out.rglob("*.yaml")) == sorted(
        ["00-secret-tls.yaml", "01-configmap-experiment.yaml", "02-service-nodes.yaml", "03-statefulset-nodes.yaml",
         "04-pvc-results.yaml", "05-job-sweep.yaml", "merge-job.yaml", "results-pod.yaml"])


def test_the_unknown_key_walk_finds_a_misspelt_field(tmp_path):
    sts = rendered(tmp_path)["03-statefulset-nodes.yaml"]
    sts["spec"]["replica"] = 4
    sts["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilites"] = {"add": ["NET_ADMIN"]}
    assert sorted(unknown_keys(sts, "V1StatefulSet")) == [
        "spec.replica", "spec.template.spec.containers[0].securityContext.capabilites"]


def test_the_rendered_pods_and_job_run_a_sweep_on_loopback(tmp_path):
    """What the cluster would run, run here: each node pod's own args (its listen address, TLS and
    models directories pointed at local ones) start real node servers on loopback; the sweep Job's
    args run `testbed run` on the ConfigMap's experiment with the inventory's pod names pointed at
    those nodes. Every row is ok and the run is the devices backend's."""
    from testbed.cli import main as testbed_main
    from testbed.comm.tls import make_certs
    from testbed.experiment.store import read_rows
    from tests.backends.devices_nodes import launch_node

    exp = tiny(name="k8s-run", nodes={"count": 3}, backend="mininet", repetitions=1, warmup=0,
               methods=["single", "sequence_parallel", {"name": "astra", "params": {"groups": 1, "codebook_size": 16}}])
    certs, models_dir = tmp_path / "tls", tmp_path / "models"
    make_certs(certs)
    models_dir.mkdir()
    files = render_kubernetes(parse_spec(exp), namespace="lab", certs=certs)
    write_kubernetes(tmp_path / "k8s", files)
    objs = {name: yaml.safe_load((tmp_path / "k8s" / name).read_text()) for name in files}
    pod_args = objs["03-statefulset-nodes.yaml"]["spec"]["template"]["spec"]["containers"][0]["args"]
    job_args = sweep_container(objs)["args"]
    local = {"0.0.0.0:50051": None, "/etc/testbed/tls": str(certs), "/models": str(models_dir)}
    nodes = []
    try:
        for i in range(3):
            args = [local.get(a, a) for a in pod_args]
            assert args[:2] == ["node", "--listen"] and args[2] is None
            nodes.append(launch_node(f"127.0.0.{31 + i}:0", tmp_path / f"node{i}.log", args=args[3:]))
        d = cluster_experiment_of(objs)
        d["devices"]["tls"] = str(certs)
        for entry, node in zip(d["devices"]["nodes"], nodes):
            entry["address"] = node.address  # the pod's stable name, as DNS would resolve it
        (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(d))
        out = tmp_path / "run"
        args = [{"/etc/testbed/experiment.yaml": str(tmp_path / "experiment.yaml")}.get(a, a) for a in job_args]
        args[args.index("--out") + 1] = str(out)
        assert testbed_main(args) == 0
        rows = read_rows(out)
        assert len(rows) == 3 and (rows["status"] == "ok").all() and (rows["agreement"] == 1.0).all()
        assert all(n.alive() for n in nodes)  # the Job's run leaves the pods serving
    finally:
        for n in nodes:
            n.stop()
