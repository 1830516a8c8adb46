"""The node server: the process each edge device runs (``python -m testbed.node --listen HOST:PORT``).

One gRPC server serves both the control plane (Node service: LoadJob, Infer, Stats,
Shutdown, Shape, Unload) and the data plane (Peer service: streams from the other ranks) on every
``--listen`` address; under emulation the orchestrator uses an unshaped control
address and the peers a shaped data address. A job is built once per LoadJob
(testbed.methods.job.RankRunner) and runs inferences on demand; any failure inside an
inference aborts the job's peer streams, so the other ranks fail at once rather
than at their deadline. SIGTERM, SIGINT, Shutdown and (with --watch-parent) the
death of the parent process all stop the node cleanly; Unload only drops the job (a node on a
real device belongs to its user and keeps serving the next run).

On a real network a node runs with ``--tls-dir DIR`` (testbed.comm.tls: mutual TLS with the
experiment's certificates, on the control plane and on its own peer streams) and
``--allow-dir DIR`` (testbed.node.access: the only directories a job may read files from). A
node refuses to listen on anything but loopback without TLS, unless told ``--insecure`` (an
emulated network, whose addresses nobody else reaches).

Shape makes the node shape its own links (testbed.net.selfshape: a real device or a container
has nobody outside to do it); whatever it installed is removed when the node stops.

A LoadJob may carry the job's astra codebooks inline (nodes on other machines do not share
the orchestrator's files): the node writes them to a private temporary file, builds the job
from it and deletes it at once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import logging
import os
import resource
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import grpc

from testbed.errors import AccessDenied, CommError, ConfigError, check
from testbed.node import serde
from testbed.comm import tls
from testbed.comm.channels import KEEPALIVE_TIMEOUT_S, is_loopback, join_hostport, make_server, split_hostport
from testbed.node.access import FileAccess
from testbed.node import host
from testbed.node.memory import process_memory
from testbed.models.probe import host_probe_s
from testbed.net.selfshape import NoNetAdmin, SelfShaper
from testbed.node.records import PROTOCOL_VERSION, LoadArgs, LoadTimes, NodeStats, RankResult
from testbed.proto import node_pb2_grpc

log = logging.getLogger("testbed.node")

#: what a node prints on stdout, once per listen address, when it serves (backends read it)
READY_PREFIX = "testbed-node listening on "


def _rpc(method):
    """Map exceptions to gRPC status codes: bad input, refused access, communication, anything else.
    Over TLS only the orchestrator's certificate may call (testbed.comm.tls.require_role)."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        tls.require_role(context, "orchestrator")  # aborts: outside the try, which would log it as a crash
        try:
            return method(self, request, context)
        except ConfigError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except AccessDenied as e:  # one line, no traceback: a refusal, not a failure of the node
            log.warning("%s refused: %s", method.__name__, e)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        except CommError as e:  # a peer failed or the job is out of step: secondary to that peer's error
            context.abort(grpc.StatusCode.ABORTED, str(e))
        except _Precondition as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except Exception as e:  # noqa: BLE001 - reported to the orchestrator with its type
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    return wrapper


class _Precondition(Exception):
    """The request does not fit the node's state (no job, another job, a broken job)."""


@dataclass
class _Job:
    args: LoadArgs
    comm: object  # GrpcCommunicator
    runner: object  # RankRunner
    inferences: int = 0
    broken: str | None = None  # why the job can run no more inferences


class NodeService(node_pb2_grpc.NodeServicer):
    """``credentials``: of this node's peer channels (None: plain); ``access``: the files jobs may read;
    ``pace_cpu``: hold every compute segment to its CPU time / this rate (testbed.comm.trace.CpuPacer)."""

    def __init__(self, hub, listen_addresses: list[str], stop: threading.Event,
                 keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S, credentials: grpc.ChannelCredentials | None = None,
                 access: FileAccess | None = None, shape_mechanism: str = "auto", pace_cpu: float | None = None):
        self.hub, self.listen_addresses, self.stop = hub, listen_addresses, stop
        self.pace_cpu = pace_cpu
        self.keepalive_timeout_s = keepalive_timeout_s
        self.credentials, self.access = credentials, access or FileAccess()
        self.shaper = SelfShaper(shape_mechanism)
        self.job: _Job | None = None
        self.started = time.monotonic()
        self._lock = threading.Lock()  # one LoadJob or Infer at a time

    @property
    def busy(self) -> bool:
        """A LoadJob or Infer is running."""
        return self._lock.locked()

    @_rpc
    def LoadJob(self, request, context):  # noqa: N802 - gRPC method name
        args = serde.read_load_request(request)
        n = args.job.world_size
        check(0 <= args.rank < n, "rank", args.rank, f"0..{n - 1} (world_size {n})")
        check(len(args.peers) == n, "peer_data_addresses", args.peers, f"{n} host:port entries (world_size)")
        for a in args.peers:
            split_hostport(a, "peer_data_addresses")
        # before anything is read, and before the current job is dropped; codebooks sent inline are no file of ours
        self.access.check_job(args.job if args.codebooks is None else dataclasses.replace(args.job, codebook_path=None))
        with self._lock:
            self.unload("a new job is loaded")
            return serde.load_response(self._build(args))

    def _build(self, args: LoadArgs) -> LoadTimes:
        import torch

        from testbed.comm.grpc import GrpcCommunicator
        from testbed.methods.job import RankRunner

        torch.set_num_threads(args.job.threads)
        t0 = time.perf_counter()
        comm = GrpcCommunicator(args.rank, args.peers, self.hub, args.job_id, timeout_s=args.comm_timeout_s,
                                connect_timeout_s=args.connect_timeout_s,
                                keepalive_timeout_s=self.keepalive_timeout_s, credentials=self.credentials)
        if self.pace_cpu is not None:
            from testbed.comm.trace import CpuPacer

            comm.trace.pacer = CpuPacer(self.pace_cpu)
        t1 = time.perf_counter()
        try:
            with _codebook_file(args.codebooks) as path:
                job = args.job if path is None else dataclasses.replace(args.job, codebook_path=path)
                runner = RankRunner(job, args.rank, comm)
        except BaseException as e:
            comm.abort(f"rank {args.rank} failed to build its shard: {type(e).__name__}: {e}")
            raise
        self.job = _Job(dataclasses.replace(args, codebooks=None), comm, runner)
        build_s = time.perf_counter() - t1
        rss_kib, pss_kib = process_memory()
        log.info("loaded job %s rank %d/%d (%s, %s), resident %d MiB", args.job_id, args.rank, args.job.world_size,
                 args.job.model, args.job.method, rss_kib // 1024)
        return LoadTimes(build_s=build_s, connect_s=t1 - t0, rss_kib=rss_kib, pss_kib=pss_kib)

    @_rpc
    def Infer(self, request, context):  # noqa: N802
        job_id = serde.read_infer_request(request)
        with self._lock:
            job = self.job
            if job is None or job.args.job_id != job_id:
                raise _Precondition(f"job {job_id!r} is not loaded here (loaded: {job.args.job_id if job else None!r})")
            if job.broken:
                raise _Precondition(f"job {job_id!r} is broken by an earlier failure ({job.broken}); load it again")
            try:
                out, wall_s = job.runner.infer()
            except BaseException as e:
                job.broken = f"{type(e).__name__}: {e}"
                job.comm.abort(f"rank {job.args.rank} failed: {job.broken}")
                raise
            job.inferences += 1
            rss_kib, pss_kib = process_memory()
            tr = job.comm.trace
            result = RankResult(rank=job.args.rank, output=out, wall_s=wall_s, compute_s=tr.compute_s,
                                comm_s=tr.comm_s, wait_s=tr.wait_s, serialize_s=tr.serialize_s,
                                bytes_sent=tr.bytes_sent, bytes_recv=tr.bytes_recv, trace=tr,
                                token_times_s=job.runner.token_times_s, generated=job.runner.generated,
                                rss_kib=rss_kib, pss_kib=pss_kib)
            return serde.infer_response(result)

    @_rpc
    def Stats(self, request, context):  # noqa: N802
        job = self.job
        data_host = serde.read_stats_request(request)
        iface = host.data_interface(data_host) if data_host else ""
        tx, rx = host.interface_counters(iface)
        return serde.stats_response(NodeStats(
            pid=os.getpid(), listen_addresses=self.listen_addresses, job_id=job.args.job_id if job else "",
            rank=job.args.rank if job else -1, inferences=job.inferences if job else 0,
            uptime_s=time.monotonic() - self.started,
            max_rss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            package_version=host.package_version(),
            protocol_version=PROTOCOL_VERSION, **host.host_info(), data_interface=iface, tx_bytes=tx, rx_bytes=rx,
            net_id=host.net_id()))

    @_rpc
    def Probe(self, request, context):  # noqa: N802
        """The probe block's median CPU seconds on one of this process's threads: under the device's
        quota where the node has one, so against the same block on a free core it measures what the
        quota's throttling costs the node's compute now."""
        runs = serde.read_probe_request(request)
        if not self._lock.acquire(blocking=False):
            raise _Precondition("busy: a job is loading or inferring; probe between inferences")
        try:
            return serde.probe_response(host_probe_s(runs))
        finally:
            self._lock.release()

    @_rpc
    def Shutdown(self, request, context):  # noqa: N802
        log.info("shutdown requested: %s", serde.read_shutdown_request(request) or "(no reason given)")
        self.stop.set()  # the main thread stops the server after this reply has gone out
        return serde.shutdown_response()

    @_rpc
    def Unload(self, request, context):  # noqa: N802
        """Drop the job and keep serving; an inference or load in flight is aborted first."""
        reason = serde.read_unload_request(request) or "(no reason given)"
        job = self.job
        if job is not None and self.busy:
            job.comm.abort(f"the orchestrator unloads the job: {reason}")
        got = self._lock.acquire(timeout=self.UNLOAD_WAIT_S)  # the aborted call returns within moments
        try:
            self.unload(reason)
        finally:
            if got:
                self._lock.release()
        return serde.unload_response()

    #: how long Unload waits for an aborted inference or load to give the job back
    UNLOAD_WAIT_S = 5.0

    @_rpc
    def Shape(self, request, context):  # noqa: N802
        return serde.shape_response(*self._shape(serde.read_shape_request(request)))

    def _shape(self, links) -> tuple[float, str]:
        """Shape this node's links (testbed.net.selfshape); one log line says what is applied."""
        try:
            result = self.shaper.shape(links)
        except NoNetAdmin as e:
            raise _Precondition(str(e)) from None
        log.info("shape (%s, %.1f ms): %s", result.mechanism, 1e3 * result.apply_s, result.summary)
        return result.apply_s, result.mechanism

    def unload(self, reason: str) -> None:
        """Drop the current job, ending its peer streams cleanly."""
        job, self.job = self.job, None
        if job is not None:
            log.info("unloading job %s: %s", job.args.job_id, reason)
            job.comm.close()


class NodeServer:
    """A running node: one gRPC server on every listen address. ``addresses`` are the bound ones.

    ``tls_dir``: serve mutual TLS with the certificates there (testbed.comm.tls) and dial peers
    with them; without it every address must be loopback unless ``insecure`` (an emulated
    network). ``allow_dirs``: the directories jobs may read files from (testbed.node.access)."""

    def __init__(self, listen: list[str], keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
                 tls_dir: str | None = None, allow_dirs: list[str] | tuple = (), insecure: bool = False,
                 shape_mechanism: str = "auto", pace_cpu: float | None = None):
        from testbed.comm.grpc import PeerHub

        check(len(listen) >= 1, "listen", listen, "at least one HOST:PORT")
        check(isinstance(keepalive_timeout_s, (int, float)) and keepalive_timeout_s >= 1, "keepalive_timeout_s",
              keepalive_timeout_s, "a number of seconds >= 1")
        check(not (insecure and tls_dir), "insecure", insecure, "not with --tls-dir (TLS or plain, not both)")
        check(pace_cpu is None or (isinstance(pace_cpu, (int, float)) and pace_cpu > 0), "pace_cpu", pace_cpu,
              "a rate > 0 in CPU-seconds per second (the device's quota / period)")
        hosts = [split_hostport(addr, "listen")[0] for addr in listen]
        if tls_dir is None and not insecure:
            for addr, host in zip(listen, hosts):
                check(is_loopback(host), "listen", addr, "a loopback address (127.0.0.0/8, ::1) for a node without "
                      "TLS; elsewhere start it with --tls-dir DIR (`testbed certs`), or --insecure on an emulated "
                      "network")
        server_creds = tls.server_credentials(tls_dir) if tls_dir else None
        peer_creds = tls.channel_credentials(tls_dir, "node") if tls_dir else None
        access = FileAccess(allow_dirs, restricted=tls_dir is not None)
        self.stop_event = threading.Event()
        self.hub = PeerHub()
        self.server = make_server(keepalive_timeout_s=keepalive_timeout_s)
        self.addresses: list[str] = []
        for addr, host in zip(listen, hosts):
            try:
                port = (self.server.add_secure_port(addr, server_creds) if server_creds
                        else self.server.add_insecure_port(addr))
            except RuntimeError as e:  # grpcio raises when the address cannot be bound
                raise ConfigError("listen", addr, f"an address this host can bind ({e})") from None
            check(port > 0, "listen", addr, "an address this host can bind")
            self.addresses.append(join_hostport(host, port))
        self.service = NodeService(self.hub, self.addresses, self.stop_event, keepalive_timeout_s,
                                   credentials=peer_creds, access=access, shape_mechanism=shape_mechanism,
                                   pace_cpu=pace_cpu)
        self.tls, self.access = tls_dir is not None, access
        node_pb2_grpc.add_NodeServicer_to_server(self.service, self.server)
        self.hub.add_to_server(self.server)
        self.server.start()

    def wait(self, poll_s: float = 0.2) -> None:
        """Block until stop is requested (Shutdown RPC, signal, parent gone)."""
        while not self.stop_event.wait(poll_s):
            pass

    def close(self, grace_s: float = 1.0) -> None:
        """Stop serving (in-flight RPCs get ``grace_s`` seconds). A job in the middle of an
        inference or a load is aborted, so that its peers fail at once instead of waiting. Then
        the node's own shaping (Shape) is removed."""
        try:
            job = self.service.job
            if job is not None and self.service.busy:
                job.comm.abort("the node is shutting down")
            self.service.unload("the node is shutting down")
            self.server.stop(grace=grace_s).wait()
        finally:
            self._unshape()

    def _unshape(self) -> None:
        """Remove whatever this node's Shapes installed (qdiscs, iptables chain, delay line)."""
        shaped = bool(self.service.shaper.applied)
        self.service.shaper.close()
        if shaped:
            log.info("shaping removed")


@contextlib.contextmanager
def _codebook_file(data: bytes | None):
    """The path of a private temporary file holding ``data`` for the block (None: no file), deleted after it."""
    if data is None:
        yield None
        return
    fd, path = tempfile.mkstemp(prefix="testbed-codebooks-", suffix=".pt")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield path
    finally:
        os.unlink(path)


def _watch_parent(stop: threading.Event) -> None:
    parent = os.getppid()

    def loop() -> None:
        while not stop.wait(0.5):
            if os.getppid() != parent:  # re-parented: whoever started us is gone
                log.warning("parent process %d is gone; stopping", parent)
                stop.set()

    threading.Thread(target=loop, daemon=True, name="watch-parent").start()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="testbed node", description="Run one edge-device node server (gRPC).")
    ap.add_argument("--listen", action="append", required=True, metavar="HOST:PORT",
                    help="address to serve on (repeatable; port 0 picks a free port)")
    ap.add_argument("--watch-parent", action="store_true", help="stop when the parent process exits")
    ap.add_argument("--keepalive-timeout-s", type=float, default=KEEPALIVE_TIMEOUT_S, metavar="S",
                    help="gRPC keepalive ack timeout of every stream (pings every S/2 seconds); longer on "
                         "slow links")
    ap.add_argument("--tls-dir", metavar="DIR",
                    help="mutual TLS with the certificates in DIR (ca.pem, node.pem, node.key from `testbed certs`): "
                         "clients and peers must hold a certificate of the same CA; needed to listen on anything "
                         "but loopback")
    ap.add_argument("--allow-dir", action="append", default=[], metavar="DIR",
                    help="a directory jobs may read weights and codebooks from (repeatable); none: with --tls-dir "
                         "no files at all, without it any file")
    ap.add_argument("--insecure", action="store_true",
                    help="listen without TLS on addresses other than loopback (emulated networks only)")
    ap.add_argument("--shape-mechanism", default="auto", choices=["auto", "htb+nfqueue", "htb+netem"],
                    help="how Shape requests are applied (auto: netem where the kernel has it, else an NFQUEUE "
                         "delay line; see testbed.net.selfshape)")
    ap.add_argument("--pace-cpu", type=float, metavar="RATE",
                    help="hold each compute segment to at least its CPU time / RATE of wall time: RATE is the "
                         "CPU-seconds per second of the CPU quota this node runs under (emulated devices), so a "
                         "segment after a wait, whose quota refilled meanwhile, is not run at host speed")
    ap.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = ap.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level,
                        format=f"%(asctime)s node[{os.getpid()}] %(levelname)s %(message)s")
    try:
        node = NodeServer(args.listen, keepalive_timeout_s=args.keepalive_timeout_s, tls_dir=args.tls_dir,
                          allow_dirs=args.allow_dir, insecure=args.insecure,
                          shape_mechanism=args.shape_mechanism, pace_cpu=args.pace_cpu)
    except ConfigError as e:
        print(f"testbed node: {e}", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: node.stop_event.set())
    if args.watch_parent:
        _watch_parent(node.stop_event)
    log.info("serving %s on %s; jobs may read %s", "mutual TLS" if node.tls else "plain gRPC",
             ", ".join(node.addresses), node.access.describe())
    for addr in node.addresses:
        print(f"{READY_PREFIX}{addr}", flush=True)
    node.wait()
    node.close()
    log.info("stopped")
    return 0
