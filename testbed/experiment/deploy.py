"""`testbed deploy kubernetes EXPERIMENT.yaml --out DIR`: the manifests that run a sweep on a cluster.

    testbed deploy kubernetes EXP.yaml --out DIR [--image IMAGE] [--namespace NS] [--anti-affinity]
                   [--shards N] [--certs DIR] [--storage 10Gi] [--storage-class C] [--models-pvc PVC]
    kubectl apply -f DIR

Writes plain YAML (dicts dumped with yaml.safe_dump), one file per object, in apply order:

- ``00-secret-tls.yaml``: Secret ``INST-tls`` with ``testbed certs DIR``'s files (ca.pem, node.pem,
  node.key, orchestrator.pem, orchestrator.key), base64; without ``--certs`` the keys are empty and the
  file says how to fill them;
- ``01-configmap-experiment.yaml``: ConfigMap ``INST-experiment``: the experiment rewritten for the
  cluster (``backend: devices``, a ``devices:`` inventory naming the node pods by their stable DNS
  names, no ``nodes.device``/``nodes.memory_mb``: the pods' resource limits are the devices);
- ``02-service-nodes.yaml``: headless Service ``INST-nodes`` (pod ``INST-nodes-K`` is
  ``INST-nodes-K.INST-nodes.NS.svc.cluster.local``);
- ``03-statefulset-nodes.yaml``: StatefulSet ``INST-nodes`` of ``nodes.count`` pods running
  ``testbed node`` (NET_ADMIN added, nothing privileged), CPU and memory from the device profile
  (``device_resources``); ``--anti-affinity``: at most one node pod per machine;
- ``04-pvc-results.yaml``: PersistentVolumeClaim ``INST-results`` for the run directories;
- ``05-job-sweep.yaml``: Job ``INST-sweep`` running ``testbed run`` into ``/results/INST/run``, or with
  ``--shards N`` an Indexed Job of N pods, pod K running ``--shard K/N`` into ``/results/INST/shard-K``;
- ``after/``: applied by hand once the sweep is done: ``merge-job.yaml`` (with ``--shards``:
  ``testbed merge``) and ``results-pod.yaml`` (a pod mounting the claim, to ``kubectl cp`` from).

Only namespaced objects (no Namespace, ClusterRole or node labels): a namespace's edit role applies
them. The pods mount no service-account token: nothing talks to the Kubernetes API.
"""

from __future__ import annotations

import argparse
import base64
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml

from testbed.errors import ConfigError, check
from testbed.experiment.spec import ExperimentSpec, load_spec
from testbed.experiment.shard import shard_for

PORT = 50051
TLS_DIR = "/etc/testbed/tls"
EXPERIMENT_PATH = "/etc/testbed/experiment.yaml"
MODELS_DIR = "/models"
RESULTS_DIR = "/results"
DEFAULT_IMAGE = "testbed:latest"
#: what `testbed certs DIR` writes; nodes get the first three, the sweep the CA and the orchestrator's pair
CERT_FILES = ("ca.pem", "node.pem", "node.key", "orchestrator.pem", "orchestrator.key")
NODE_CERTS = ("ca.pem", "node.pem", "node.key")
ORCHESTRATOR_CERTS = ("ca.pem", "orchestrator.pem", "orchestrator.key")
#: memory requested per pod when the experiment sets no nodes.memory_mb (then no limit either)
DEFAULT_MEMORY_MIB = 1024
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$")


def instance_name(spec: ExperimentSpec) -> str:
    """The experiment's name as a DNS label part (lower case, [a-z0-9-], at most 40 characters)."""
    name = re.sub(r"[^a-z0-9-]+", "-", spec.name.lower()).strip("-")[:40].strip("-")
    return name or "experiment"


def labels(inst: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "testbed", "app.kubernetes.io/instance": inst,
            "app.kubernetes.io/component": component, "app.kubernetes.io/managed-by": "testbed-deploy"}


def selector(inst: str, component: str) -> dict[str, str]:
    return {k: v for k, v in labels(inst, component).items() if k != "app.kubernetes.io/managed-by"}


def node_address(inst: str, namespace: str, rank: int) -> str:
    """The stable DNS name and port of node pod ``rank`` (the StatefulSet's pod behind the headless Service)."""
    return f"{inst}-nodes-{rank}.{inst}-nodes.{namespace}.svc.cluster.local:{PORT}"


def device_resources(spec: ExperimentSpec) -> dict[str, Any]:
    """The node pods' resources from the experiment's device profile (testbed.experiment.topology.node_devices):
    CPU = speed x cores (a device core of speed 0.5 is half a core of the machine the pod lands on), memory =
    memory_mb MiB; requests equal limits (the Guaranteed class: the pod gets what the device has, no more).
    Without memory_mb: a request of DEFAULT_MEMORY_MIB and no memory limit. Raises ConfigError when the
    nodes' devices differ (one StatefulSet gives every pod the same resources)."""
    from testbed.experiment.topology import node_devices

    devices = node_devices(spec)
    distinct = sorted({(d.speed, d.cores, d.memory_mb) for d in devices}, key=str)
    check(len(distinct) == 1, "topology hosts' device", [f"speed {s} x {c} cores, memory_mb {m}" for s, c, m in distinct],
          "the same device on every node (one StatefulSet gives every pod the same resources); set "
          "nodes.device.speed and nodes.memory_mb in the experiment to give them one")
    d = devices[0]
    cpu = f"{max(1, round(d.speed * d.cores * 1000))}m"
    if d.memory_mb is None:
        return {"requests": {"cpu": cpu, "memory": f"{DEFAULT_MEMORY_MIB}Mi"}, "limits": {"cpu": cpu}}
    mem = f"{d.memory_mb}Mi"
    return {"requests": {"cpu": cpu, "memory": mem}, "limits": {"cpu": cpu, "memory": mem}}


def cluster_experiment(spec: ExperimentSpec, inst: str, namespace: str) -> dict:
    """The experiment as the sweep pod runs it: ``backend: devices`` with the node pods as its inventory.

    ``nodes.device`` and ``nodes.memory_mb`` are left out: the pods' resource limits are the devices
    (only the emulating backends model them); a time dilation other than auto becomes 1 (each pod has its
    own cores: nothing to dilate); the topology becomes the devices backend's mesh (the sweep's
    one-way, host-to-host profile between every pair of pods, each pod shaping its own links)."""
    from testbed.experiment.spec import DEVICES_TOPOLOGY

    d = spec.to_dict()
    d["backend"], d["output_dir"] = "devices", None
    d["nodes"] = {"count": spec.nodes.count, "threads": spec.nodes.threads}
    if d["emulation"]["time_dilation"] != "auto":
        d["emulation"]["time_dilation"] = 1.0
    d["topology"] = DEVICES_TOPOLOGY
    d["devices"] = {"nodes": [{"name": f"node-{i}", "address": node_address(inst, namespace, i)}
                              for i in range(spec.nodes.count)], "tls": TLS_DIR}
    return d


def read_certs(certs: str | Path | None) -> dict[str, str] | None:
    """CERT_FILES of ``certs`` (made by `testbed certs DIR`) base64-encoded; None for None."""
    if certs is None:
        return None
    d = Path(certs)
    missing = [f for f in CERT_FILES if not (d / f).is_file()]
    check(not missing, "--certs", str(certs), f"a directory made by `testbed certs DIR` holding {', '.join(CERT_FILES)}"
          f" (missing: {', '.join(missing)})")
    return {f: base64.b64encode((d / f).read_bytes()).decode() for f in CERT_FILES}


def render_kubernetes(spec: ExperimentSpec, *, namespace: str = "default", image: str = DEFAULT_IMAGE,
                      anti_affinity: bool = False, shards: int | None = None, certs: str | Path | None = None,
                      storage: str = "10Gi", storage_class: str | None = None,
                      models_pvc: str | None = None) -> dict[str, tuple[str, dict]]:
    """file name -> (comment block, object) of every manifest; raises ConfigError, writes nothing."""
    check(bool(_DNS_LABEL.match(namespace)) and len(namespace) <= 63, "--namespace", namespace,
          "a DNS label: lower case letters, digits and '-', at most 63 characters")
    check(bool(image) and not any(c.isspace() for c in image), "--image", image, "an image reference, e.g. "
          "registry.example.com/testbed:0.1.0")
    check(bool(_QUANTITY.match(storage)), "--storage", storage, "a Kubernetes quantity such as 10Gi")
    if shards is not None:
        check(isinstance(shards, int) and shards >= 1, "--shards", shards, "an integer >= 1")
        shard_for(spec, f"0/{shards}", "--shards")  # N <= the sweep's units
    inst = instance_name(spec)
    resources = device_resources(spec)
    data = read_certs(certs)
    n = spec.nodes.count
    experiment = cluster_experiment(spec, inst, namespace)

    def meta(name: str, component: str) -> dict:
        return {"name": name, "namespace": namespace, "labels": labels(inst, component)}

    files: dict[str, tuple[str, dict]] = {}
    secret_note = ("TLS certificates of the nodes and the sweep (`testbed certs DIR`), base64." if data else
                   "EMPTY: no --certs given. Make them and render again:\n"
                   f"  testbed certs certs/ && testbed deploy kubernetes EXPERIMENT.yaml --certs certs/ ...\n"
                   "or fill this Secret from the files:\n"
                   f"  kubectl -n {namespace} create secret generic {inst}-tls "
                   + " ".join(f"--from-file=certs/{f}" for f in CERT_FILES) + " --dry-run=client -o yaml | "
                   "kubectl apply -f -\nThe node certificate must be valid for the node pods' names "
                   f"({inst}-nodes-K.{inst}-nodes.{namespace}.svc.cluster.local).")
    files["00-secret-tls.yaml"] = (secret_note, {
        "apiVersion": "v1", "kind": "Secret", "metadata": meta(f"{inst}-tls", "tls"), "type": "Opaque",
        "data": data if data else {f: "" for f in CERT_FILES}})
    text = ("# The experiment as the sweep runs it in the cluster (testbed deploy kubernetes): backend devices,\n"
            "# the node pods as its inventory; nodes.device and nodes.memory_mb are the pods' resource limits.\n"
            + yaml.safe_dump(experiment, sort_keys=False, width=1000))
    files["01-configmap-experiment.yaml"] = ("The experiment file the sweep runs (mounted at "
                                             f"{EXPERIMENT_PATH}).", {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(f"{inst}-experiment", "experiment"),
        "data": {"experiment.yaml": text}})
    files["02-service-nodes.yaml"] = ("Headless Service: stable DNS names for the node pods "
                                      f"({inst}-nodes-K.{inst}-nodes.{namespace}.svc.cluster.local).", {
        "apiVersion": "v1", "kind": "Service", "metadata": meta(f"{inst}-nodes", "node"),
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": selector(inst, "node"),
                 "ports": [{"name": "grpc", "port": PORT, "targetPort": PORT, "protocol": "TCP"}]}})

    def volume_mounts(certs_for: tuple[str, ...]) -> tuple[list, list]:
        mounts = [{"name": "tls", "mountPath": TLS_DIR, "readOnly": True}]
        vols = [{"name": "tls", "secret": {"secretName": f"{inst}-tls", "defaultMode": 0o400,
                                           "items": [{"key": f, "path": f} for f in certs_for]}}]
        if models_pvc:
            mounts.append({"name": "models", "mountPath": MODELS_DIR, "readOnly": True})
            vols.append({"name": "models", "persistentVolumeClaim": {"claimName": models_pvc, "readOnly": True}})
        return mounts, vols

    node_mounts, node_vols = volume_mounts(NODE_CERTS)
    node_pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": 10,
        "containers": [{
            "name": "node", "image": image, "imagePullPolicy": "IfNotPresent",
            "args": ["node", "--listen", f"0.0.0.0:{PORT}", "--tls-dir", TLS_DIR, "--allow-dir", MODELS_DIR],
            "ports": [{"name": "grpc", "containerPort": PORT, "protocol": "TCP"}],
            "resources": resources,
            "securityContext": {"privileged": False, "allowPrivilegeEscalation": False,
                                "capabilities": {"add": ["NET_ADMIN"]}},
            "readinessProbe": {"tcpSocket": {"port": PORT}, "periodSeconds": 2},
            "volumeMounts": node_mounts,
        }],
        "volumes": node_vols,
    }
    if anti_affinity:
        node_pod["affinity"] = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": selector(inst, "node")}, "topologyKey": "kubernetes.io/hostname"}]}}
    cpu, mem = resources["limits"]["cpu"], resources["limits"].get("memory", "no limit")
    files["03-statefulset-nodes.yaml"] = (
        f"{n} node pods (nodes.count), one per rank, in rank order: pod K is rank K. Each is one device: "
        f"CPU {cpu} and memory {mem} from the experiment's device profile (speed x cores of the machine it "
        "lands on; nodes.memory_mb)." + (" At most one node pod per machine (--anti-affinity)." if anti_affinity
                                         else ""), {
            "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta(f"{inst}-nodes", "node"),
            "spec": {"serviceName": f"{inst}-nodes", "replicas": n, "podManagementPolicy": "Parallel",
                     "selector": {"matchLabels": selector(inst, "node")},
                     "template": {"metadata": {"labels": labels(inst, "node")}, "spec": node_pod}}})
    pvc_spec: dict[str, Any] = {"accessModes": ["ReadWriteMany" if shards else "ReadWriteOnce"],
                                "resources": {"requests": {"storage": storage}}}
    if storage_class:
        pvc_spec["storageClassName"] = storage_class
    files["04-pvc-results.yaml"] = (
        "The run directories (rows, traces, manifest, plots, report)." + (
            " ReadWriteMany: the shards' pods may run on different machines (needs a storage class that "
            "offers it, e.g. NFS; --storage-class)." if shards else ""), {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta(f"{inst}-results", "results"),
            "spec": pvc_spec})

    job_mounts, job_vols = volume_mounts(ORCHESTRATOR_CERTS)
    job_mounts = job_mounts + [{"name": "experiment", "mountPath": EXPERIMENT_PATH, "subPath": "experiment.yaml",
                                "readOnly": True}, {"name": "results", "mountPath": RESULTS_DIR}]
    job_vols = job_vols + [{"name": "experiment", "configMap": {"name": f"{inst}-experiment"}},
                           {"name": "results", "persistentVolumeClaim": {"claimName": f"{inst}-results"}}]
    run_dir = f"{RESULTS_DIR}/{inst}/" + ("shard-$(JOB_COMPLETION_INDEX)" if shards else "run")
    args = ["run", EXPERIMENT_PATH, "--out", run_dir, "--quiet"]
    if shards:
        args += ["--shard", f"$(JOB_COMPLETION_INDEX)/{shards}"]
    addresses = [node_address(inst, namespace, i) for i in range(n)]
    wait = ("import socket, sys, time\n"
            f"addrs = {addresses!r}\n"
            "deadline = time.time() + 600\n"
            "for a in addrs:\n"
            "    host, port = a.rsplit(':', 1)\n"
            "    while True:\n"
            "        try:\n"
            "            socket.create_connection((host, int(port)), timeout=2).close()\n"
            "            break\n"
            "        except OSError:\n"
            "            if time.time() > deadline:\n"
            "                sys.exit(f'node {a} not reachable after 600 s')\n"
            "            time.sleep(2)\n"
            "print('all nodes reachable')\n")
    job_pod = {
        "automountServiceAccountToken": False, "restartPolicy": "Never",
        "initContainers": [{"name": "wait-for-nodes", "image": image, "imagePullPolicy": "IfNotPresent",
                            "command": ["python", "-c", wait],
                            "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}}}],
        "containers": [{"name": "sweep", "image": image, "imagePullPolicy": "IfNotPresent", "args": args,
                        "resources": {"requests": {"cpu": "1", "memory": resources["requests"]["memory"]}},
                        "securityContext": {"privileged": False, "allowPrivilegeEscalation": False},
                        "volumeMounts": job_mounts}],
        "volumes": job_vols,
    }
    job_spec: dict[str, Any] = {"backoffLimit": 0, "template": {"metadata": {"labels": labels(inst, "sweep")},
                                                               "spec": job_pod}}
    if shards:
        job_spec.update(completionMode="Indexed", completions=shards, parallelism=shards)
    files["05-job-sweep.yaml"] = (
        (f"The sweep: an Indexed Job of {shards} pods; pod K runs shard K/{shards} into {RESULTS_DIR}/{inst}/shard-K "
         f"(then after/merge-job.yaml joins them into {RESULTS_DIR}/{inst}/run)" if shards else
         f"The sweep: testbed run into {RESULTS_DIR}/{inst}/run") + " once every node pod answers. A failed pod is "
        "not retried (backoffLimit 0): the rows so far stay on the claim; continue with testbed run --resume DIR.", {
            "apiVersion": "batch/v1", "kind": "Job", "metadata": meta(f"{inst}-sweep", "sweep"), "spec": job_spec})

    results_mounts = [{"name": "results", "mountPath": RESULTS_DIR}]
    results_vols = [{"name": "results", "persistentVolumeClaim": {"claimName": f"{inst}-results"}}]
    if shards:
        files["after/merge-job.yaml"] = (
            f"Apply once {inst}-sweep has completed: testbed merge of the {shards} shards into {RESULTS_DIR}/{inst}/run.", {
                "apiVersion": "batch/v1", "kind": "Job", "metadata": meta(f"{inst}-merge", "merge"),
                "spec": {"backoffLimit": 0, "template": {"metadata": {"labels": labels(inst, "merge")}, "spec": {
                    "automountServiceAccountToken": False, "restartPolicy": "Never",
                    "containers": [{"name": "merge", "image": image, "imagePullPolicy": "IfNotPresent",
                                    "args": ["merge", f"{RESULTS_DIR}/{inst}/run",
                                             *(f"{RESULTS_DIR}/{inst}/shard-{k}" for k in range(shards))],
                                    "resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
                                    "volumeMounts": results_mounts}],
                    "volumes": results_vols}}}})
    files["after/results-pod.yaml"] = (
        f"A pod that mounts the results claim, to copy the run out: kubectl -n {namespace} cp "
        f"{inst}-results:{RESULTS_DIR}/{inst}/run ./{inst}-run", {
            "apiVersion": "v1", "kind": "Pod", "metadata": meta(f"{inst}-results", "results"),
            "spec": {"automountServiceAccountToken": False, "restartPolicy": "Never",
                     "containers": [{"name": "results", "image": image, "imagePullPolicy": "IfNotPresent",
                                     "command": ["sleep", "infinity"],
                                     "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
                                     "volumeMounts": results_mounts}],
                     "volumes": results_vols}})
    return files


class _Dumper(yaml.SafeDumper):
    """safe_dump with multi-line strings (the experiment file, the wait script) as literal blocks."""


def _str(dumper: yaml.SafeDumper, s: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)


_Dumper.add_representer(str, _str)


def dump(comment: str, obj: dict) -> str:
    """One manifest file: the comment block, then the object."""
    lines = [w for line in comment.splitlines() for w in (textwrap.wrap(line, 110, subsequent_indent="  ")
                                                          if len(line) > 110 and not line.startswith("  ") else [line])]
    head = "".join(f"# {line}\n" if line else "#\n" for line in lines)
    return head + yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=120)


def write_kubernetes(out: str | Path, files: dict[str, tuple[str, dict]]) -> list[Path]:
    written = []
    for name, (comment, obj) in files.items():
        p = Path(out) / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(dump(comment, obj))
        written.append(p)
    return written


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="testbed deploy", description="Write the manifests that run an experiment "
                                "on a cluster.")
    sub = p.add_subparsers(dest="target", required=True, metavar="TARGET")
    k = sub.add_parser("kubernetes", help="StatefulSet of node pods, headless Service, TLS Secret, experiment "
                       "ConfigMap, results claim and the sweep Job", description=__doc__.split("\n\n")[0])
    k.add_argument("experiment", metavar="EXPERIMENT.yaml")
    k.add_argument("--out", metavar="DIR", required=True, help="where to write the YAML files (new or empty)")
    k.add_argument("--image", default=DEFAULT_IMAGE, help=f"the testbed image (default {DEFAULT_IMAGE}; build it "
                   "from the repository's Dockerfile and push it where the cluster pulls from)")
    k.add_argument("--namespace", default="default", help="namespace of every object (default: default)")
    k.add_argument("--anti-affinity", action="store_true", help="at most one node pod per machine")
    k.add_argument("--shards", type=int, metavar="N", help="run the sweep as an Indexed Job of N pods, pod K "
                   "running --shard K/N (then after/merge-job.yaml)")
    k.add_argument("--certs", metavar="DIR", help="the certificates `testbed certs DIR` made (default: an empty "
                   "Secret, to fill)")
    k.add_argument("--storage", default="10Gi", help="size of the results claim (default 10Gi)")
    k.add_argument("--storage-class", metavar="CLASS", help="storage class of the results claim (default: the "
                   "cluster's)")
    k.add_argument("--models-pvc", metavar="CLAIM", help=f"an existing claim with model weights, mounted read-only "
                   f"at {MODELS_DIR} (the experiment's weights_path must point there)")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError("--out", str(out), "a new or empty directory")
        spec = load_spec(args.experiment)
        files = render_kubernetes(spec, namespace=args.namespace, image=args.image, anti_affinity=args.anti_affinity,
                                  shards=args.shards, certs=args.certs, storage=args.storage,
                                  storage_class=args.storage_class, models_pvc=args.models_pvc)
    except ConfigError as e:
        print(f"testbed deploy: error: {e}", file=sys.stderr)
        return 2
    for path in write_kubernetes(out, files):
        print(path)
    inst, ns = instance_name(spec), args.namespace
    if not args.certs:
        print(f"testbed deploy: the TLS Secret is empty: make certificates with `testbed certs certs/` and render "
              f"again with --certs certs/ (see {out / '00-secret-tls.yaml'})", file=sys.stderr)
    print(f"next: kubectl apply -f {out} && kubectl -n {ns} logs -f job/{inst}-sweep" +
          (f"; then kubectl apply -f {out / 'after' / 'merge-job.yaml'}" if args.shards else "") +
          f"; to copy the results: kubectl apply -f {out / 'after' / 'results-pod.yaml'} && "
          f"kubectl -n {ns} cp {inst}-results:{RESULTS_DIR}/{inst}/run ./{inst}-run")
    return 0
