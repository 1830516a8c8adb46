"""Mutual TLS and allowed directories: real node processes on 127.0.0.x serving real TLS.

Certificates come from `testbed certs` (two experiments: A, whose certificates the nodes hold,
and B, another experiment's). The nodes run with --tls-dir A and --allow-dir ALLOWED; after
every refusal the same nodes must still serve A's orchestrator.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch

from testbed.backends.base import read_lines, ready_addresses
from testbed.cli import main as cli_main
from testbed.comm import InProcessGroup, frames, tls
from testbed.comm.channels import CONTROL_CHANNEL_OPTIONS
from testbed.comm.grpc import GrpcCommunicator, PeerServer
from testbed.errors import AccessDenied, CommError, ConfigError
from testbed.methods.job import JobSpec, RankRunner
from testbed.models import build_model, save_hf_weights
from testbed.node import serde
from testbed.node.access import FileAccess
from testbed.node.orchestrator import NodeError, Orchestrator
from testbed.node.records import NodeAddress
from testbed.node.server import NodeServer
from testbed.proto import node_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
N = 3
TOKENS = 17  # vit-tiny: 16 patches + CLS


def _env() -> dict:
    """The nodes' environment: this checkout importable; gRPC's own logging at its defaults (the
    node's log then holds gRPC's line per refused handshake)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GRPC_VERBOSITY", "GRPC_TRACE")}
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Certificates A and B, an allowed directory with weights, a file outside it, and N TLS nodes."""
    base = tmp_path_factory.mktemp("tls")
    a, b = base / "ca-a", base / "ca-b"
    assert cli_main(["certs", str(a)]) == 0
    assert cli_main(["certs", str(b), "--days", "2"]) == 0
    allowed, outside = base / "allowed", base / "outside"
    allowed.mkdir()
    outside.mkdir()
    weights = build_model("vit-tiny", seed=7)  # not the job's seed: equal outputs prove the file was read
    save_hf_weights(weights, allowed / "vit.safetensors")
    save_hf_weights(weights, outside / "vit.safetensors")
    (allowed / "escape.safetensors").symlink_to(outside / "vit.safetensors")
    procs, logs = [], [base / f"node{r}.log" for r in range(N)]
    try:
        for r in range(N):
            with open(logs[r], "wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "testbed.node", "--listen", f"127.0.0.{21 + r}:0", "--watch-parent",
                     "--tls-dir", str(a), "--allow-dir", str(allowed)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=_env(), cwd=base))
        deadline = time.monotonic() + 120
        addresses = []
        for r, p in enumerate(procs):
            got = ready_addresses(read_lines(p, 1, deadline))
            assert got, f"node {r} did not start: {logs[r].read_text()}"
            addresses.append(NodeAddress(control=got[0], data=got[0]))
        yield dict(a=a, b=b, allowed=allowed, outside=outside, weights=weights, addresses=addresses, logs=logs)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            p.stdout.close()


def orchestrator(world, tls_dir=None, **kw) -> Orchestrator:
    return Orchestrator(world["addresses"], timeout_s=60, tls_dir=str(tls_dir or world["a"]), **kw)


def still_serves(world) -> None:
    """A's orchestrator still reaches every node (and lets go of them without stopping them)."""
    orch = orchestrator(world)
    try:
        assert len(orch.stats()) == N
    finally:
        orch.disconnect()


def reference(job: JobSpec) -> torch.Tensor:
    group = InProcessGroup(job.world_size, timeout_s=60)
    runners = [RankRunner(job, r, group.communicator(r)) for r in range(job.world_size)]
    outs = [None] * job.world_size

    def body(r):
        outs[r], _ = runners[r].infer()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(job.world_size)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    return next(o for o in outs if o is not None)


def load_and_infer(world, job: JobSpec):
    orch = orchestrator(world)
    try:
        orch.load(job)
        return orch.infer()
    finally:
        orch.disconnect()


def test_an_authenticated_orchestrator_runs_a_job_whose_peers_talk_over_tls(world):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the nodes run one thread: bit-equal outputs
    try:
        job = JobSpec(model="vit-tiny", method="sequence_parallel", world_size=N, tokens=TOKENS, seed=3, threads=1)
        got = load_and_infer(world, job)
        assert torch.equal(got.output, reference(job))
    finally:
        torch.set_num_threads(before)
    # every rank exchanged data with every peer (all-gathers; rank 1 dials rank 2 and is dialled by
    # rank 0): the nodes' servers take TLS only, so the streams were TLS
    assert all(node.bytes_sent > 0 and node.bytes_recv > 0 for node in got.nodes)


def _stats(world, credentials):
    ch = tls.open_channel(world["addresses"][0].control, CONTROL_CHANNEL_OPTIONS, credentials)
    try:
        return node_pb2_grpc.NodeStub(ch).Stats(serde.stats_request(), timeout=10)
    finally:
        ch.close()


def test_a_plain_client_is_refused(world):
    lines = len(world["logs"][0].read_text().splitlines())
    with pytest.raises(grpc.RpcError) as info:
        _stats(world, None)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    new = world["logs"][0].read_text().splitlines()[lines:]  # gRPC's own line per refused handshake
    assert [ln for ln in new if "Handshake failed" in ln] and not [ln for ln in new if "Traceback" in ln], new
    with pytest.raises(NodeError, match="connect failed on rank 0.*--tls-dir"):
        Orchestrator(world["addresses"], timeout_s=10, connect_timeout_s=1.5)
    still_serves(world)


def test_a_client_with_another_experiments_certificate_is_refused(world):
    with pytest.raises(grpc.RpcError) as info:
        _stats(world, tls.channel_credentials(world["b"], "orchestrator"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "handshake" in info.value.details().lower()
    # ca.pem is no secret: a client that trusts A's CA still needs a certificate signed by it
    b = tls.load_identity(world["b"], "orchestrator")
    a_ca = (world["a"] / "ca.pem").read_bytes()
    lines = len(world["logs"][0].read_text().splitlines())
    with pytest.raises(grpc.RpcError) as info:
        _stats(world, grpc.ssl_channel_credentials(root_certificates=a_ca, private_key=b.key,
                                                   certificate_chain=b.cert))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    new = world["logs"][0].read_text().splitlines()[lines:]  # the node refused the handshake, without a traceback
    assert [ln for ln in new if "CERTIFICATE_VERIFY_FAILED" in ln] and not [ln for ln in new if "Traceback" in ln]
    with pytest.raises(NodeError, match="connect failed on rank 0.*certificate"):
        orchestrator(world, tls_dir=world["b"], connect_timeout_s=1.5)
    still_serves(world)


def test_each_certificate_gets_its_own_plane_only(world):
    # the node certificate (any device's) cannot drive a node's control plane ...
    with pytest.raises(grpc.RpcError) as info:
        _stats(world, tls.channel_credentials(world["a"], "node"))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # ... and the orchestrator's cannot open a peer stream
    ch = tls.open_channel(world["addresses"][0].data, [], tls.channel_credentials(world["a"], "orchestrator"))
    try:
        call = ch.stream_stream(frames.EXCHANGE_METHOD)(iter([frames.encode_hello("job", 0, 1)]), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            next(call)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        ch.close()
    still_serves(world)


@pytest.mark.parametrize("field, where", [("weights_path", "outside/vit.safetensors"),
                                          ("weights_path", "allowed/escape.safetensors"),  # a symlink out
                                          ("weights_path", "allowed/../outside/vit.safetensors"),
                                          ("codebook_path", "outside/codebooks.pt")])
def test_a_job_reading_outside_the_allowed_directories_is_refused(world, field, where):
    path = str(world["allowed"].parent / where)
    job = JobSpec(model="vit-tiny", method="sequence_parallel", world_size=N, tokens=TOKENS, **{field: path})
    lines = len(world["logs"][0].read_text().splitlines())
    with pytest.raises(NodeError, match="PERMISSION_DENIED") as info:
        load_and_infer(world, job)
    assert info.value.phase == "load" and path in str(info.value)
    new = world["logs"][0].read_text().splitlines()[lines:]
    assert len(new) == 1 and "LoadJob refused" in new[0] and path in new[0], new  # one line, no traceback
    still_serves(world)


def test_a_job_reading_inside_the_allowed_directories_runs(world):
    job = JobSpec(model="vit-tiny", method="sequence_parallel", world_size=N, tokens=TOKENS, threads=1,
                  weights_path=str(world["allowed"] / "vit.safetensors"))
    got = load_and_infer(world, job)
    assert torch.allclose(got.output, reference(job), atol=1e-5)
    assert not torch.allclose(got.output, reference(replace(job, weights_path=None)), atol=1e-3)  # the file's
    assert "Traceback" not in "".join(log.read_text() for log in world["logs"])


def test_a_tls_node_without_allowed_directories_reads_no_files(tmp_path):
    job = JobSpec(model="vit-tiny", method="single", weights_path=str(tmp_path / "w.safetensors"))
    FileAccess([], restricted=False).check_job(job)  # plain node (loopback, emulation): any path, as before
    with pytest.raises(AccessDenied, match="start the node with --allow-dir DIR"):
        FileAccess([], restricted=True).check_job(job)
    FileAccess([str(tmp_path)], restricted=True).check_job(job)


def test_every_file_of_a_checkpoint_directory_must_lie_inside(tmp_path):
    """A checkpoint directory inside is not enough: its index may list shards elsewhere, its
    config.json may be a link out; each is checked before the loader opens it."""
    from testbed.models.hf_checkpoint import INDEX

    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "ckpt").mkdir(parents=True)
    outside.mkdir()
    (outside / "shard.safetensors").write_bytes(b"")
    (allowed / "ckpt" / "config.json").write_text("{}")
    (allowed / "ckpt" / "model-00001-of-00001.safetensors").write_bytes(b"")
    index = allowed / "ckpt" / INDEX
    index.write_text('{"weight_map": {"a": "model-00001-of-00001.safetensors"}}')
    access = FileAccess([str(allowed)])
    job = JobSpec(model="llama-tiny", method="single", weights_path=str(allowed / "ckpt"))
    access.check_job(job)
    index.write_text('{"weight_map": {"a": "../../outside/shard.safetensors"}}')
    with pytest.raises(AccessDenied, match="shard.safetensors"):
        access.check_job(job)
    index.unlink()
    (allowed / "ckpt" / "config.json").unlink()
    (allowed / "ckpt" / "config.json").symlink_to(outside / "shard.safetensors")
    with pytest.raises(AccessDenied, match="config.json"):
        access.check_job(job)


def test_a_node_without_tls_refuses_to_listen_beyond_loopback():
    done = subprocess.run([sys.executable, "-m", "testbed.node", "--listen", "0.0.0.0:0"], capture_output=True,
                          text=True, timeout=120, env=_env(), stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "listen" in lines[0] and "--tls-dir" in lines[0], done.stderr
    assert done.stdout == ""


def test_certs_writes_private_keys_0600_and_refuses_to_overwrite_without_force(tmp_path, capsys):
    d = tmp_path / "certs"
    assert cli_main(["certs", str(d)]) == 0
    names = sorted(p.name for p in d.iterdir())
    assert names == sorted(n for pair in tls.FILES.values() for n in pair)
    for _, key in tls.FILES.values():
        assert stat.S_IMODE((d / key).stat().st_mode) == 0o600
    for role in tls.ROLES:
        tls.load_identity(d, role)
    before = {n: (d / n).read_bytes() for n in names}
    capsys.readouterr()
    assert cli_main(["certs", str(d)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0] and "ca.pem" in err[0]
    assert {n: (d / n).read_bytes() for n in names} == before  # nothing written
    assert cli_main(["certs", str(d), "--force"]) == 0
    assert (d / "ca.pem").read_bytes() != before["ca.pem"]
    assert stat.S_IMODE((d / "ca.key").stat().st_mode) == 0o600


def test_peer_streams_run_over_tls_and_refuse_a_peer_of_another_experiment(world):
    """The data plane alone (two ranks in this process): a rank dialling with A's node certificate
    all-gathers with its peer; one holding B's certificate cannot reach it (nor would a peer
    with B's certificate be accepted by it, its handshake fails the same way)."""
    servers = [PeerServer(f"127.0.0.{31 + r}:0", tls_dir=str(world["a"])) for r in range(2)]
    addresses = [srv.address for srv in servers]
    try:
        own = tls.channel_credentials(world["a"], "node")
        out = [None, None]

        def rank(r):
            comm = GrpcCommunicator(r, addresses, servers[r].hub, "tls-job", timeout_s=20, credentials=own)
            try:
                out[r] = comm.all_gather(torch.full((2,), float(r)))
            finally:
                comm.close()

        threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
        [t.start() for t in threads]
        [t.join(30) for t in threads]
        assert all(torch.equal(torch.cat(o), torch.tensor([0.0, 0.0, 1.0, 1.0])) for o in out)
        with pytest.raises(CommError, match="TLS certificate"):
            GrpcCommunicator(0, addresses, servers[0].hub, "foreign", connect_timeout_s=1.0,
                             credentials=tls.channel_credentials(world["b"], "node"))
    finally:
        for srv in servers:
            srv.stop()


def test_a_node_whose_tls_dir_is_incomplete_or_conflicting_does_not_start(tmp_path, world):
    (tmp_path / "ca.pem").write_bytes((world["a"] / "ca.pem").read_bytes())
    with pytest.raises(ConfigError, match="node.pem") as info:
        NodeServer(["127.0.0.1:0"], tls_dir=str(tmp_path))
    assert info.value.field == "tls_dir"
    for name in ("node.pem", "node.key"):  # another experiment's node certificate beside A's ca.pem
        (tmp_path / name).write_bytes((world["b"] / name).read_bytes())
    with pytest.raises(ConfigError, match="not signed by its ca.pem"):
        NodeServer(["127.0.0.1:0"], tls_dir=str(tmp_path))
    with pytest.raises(ConfigError) as info:
        NodeServer(["127.0.0.1:0"], tls_dir=str(world["a"]), insecure=True)
    assert info.value.field == "insecure"
    with pytest.raises(ConfigError) as info:
        NodeServer(["127.0.0.1:0"], allow_dirs=[str(tmp_path / "missing")])
    assert info.value.field == "allow_dir"
