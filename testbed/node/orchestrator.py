"""The orchestrator: the client that drives N node servers through one job.

It loads a job on every node at once (each node then opens its peer streams and
builds its shard), asks nodes that shape their own links to do so (``shape``), runs inferences by asking every rank at once and timing the
whole from the client's side, and stops the nodes. If any node fails, dies or
misses the deadline, it raises a NodeError naming the rank, its address and what
happened (the root cause is preferred over the ranks that merely lost that peer),
and stops the other nodes so nothing is left waiting. Nodes it does not own
(``owns_nodes=False``: servers on real devices, started by their user) are never stopped:
where it would stop them it unloads their job (Unload), and they keep serving.
"""

from __future__ import annotations

import queue
import time
import uuid
from typing import Callable, Sequence

import grpc

from testbed.errors import CommError, ConfigError, check
from testbed.methods.job import JobSpec
from testbed.models.probe import PROBE_RUNS
from testbed.net.profile import LinkProfile
from testbed.net.selfshape import node_shares
from testbed.node import serde
from testbed.comm import tls
from testbed.comm.channels import CONTROL_CHANNEL_OPTIONS, split_hostport
from testbed.node.records import InferenceResult, LoadArgs, LoadTimes, NodeAddress, NodeStats
from testbed.proto import node_pb2_grpc


class NodeError(CommError):
    """A node failed, died or missed the deadline. ``rank``, ``address``, ``phase`` say which and when."""

    def __init__(self, phase: str, rank: int, address: str, what: str, others: str = ""):
        self.phase, self.rank, self.address, self.what = phase, rank, address, what
        tail = f" [other ranks: {others}]" if others else ""
        super().__init__(f"{phase} failed on rank {rank} ({address}): {what}{tail}")


# Status codes that mean "this rank only saw another rank fail" (CommError on the node).
_SECONDARY = {grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED}
# Status codes that mean the node itself died, is unreachable or hangs.
_GONE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
# Phases whose refusal by a node leaves every node running (nothing waits on a peer in them).
_REJECTABLE = {"load", "shape", "probe"}


class Orchestrator:
    """Drives the nodes at ``addresses`` (rank order). ``timeout_s``: deadline of one inference;
    ``connect_timeout_s``: for reaching the nodes and for the nodes reaching each other;
    ``load_timeout_s``: for building a job. The nodes wait for each peer message at most
    ``PEER_WAIT_FRACTION * timeout_s``, so a silent rank is named by its peers, and the
    other nodes stopped, before the orchestrator's own deadline fires. ``tls_dir``: a directory made
    by ``testbed certs`` (ca.pem, orchestrator.pem, orchestrator.key): talk mutual TLS to nodes
    started with ``--tls-dir`` (testbed.comm.tls); None: plain gRPC. ``owns_nodes`` False:
    the nodes are someone else's; they are unloaded, never stopped (``release``)."""

    PEER_WAIT_FRACTION = 0.5
    # After the first failure, how long the others get to report theirs (failures cascade
    # through broken streams within milliseconds; this only has to find the root cause).
    GRACE_S = 1.0
    # A Shutdown RPC gets this long: a node that cannot answer it (frozen) is the backend's to kill.
    STOP_RPC_S = 1.0
    # A Shape gets this long: the first one probes the kernel and starts the node's delay line.
    SHAPE_RPC_S = 60.0
    #: deadline of a probe: ~0.2 s of CPU per node, stretched by the device's quota (F x) and by
    #: nodes sharing the cores
    PROBE_RPC_S = 60.0

    def __init__(self, addresses: Sequence[NodeAddress], timeout_s: float = 120.0, connect_timeout_s: float = 10.0,
                 load_timeout_s: float = 300.0, tls_dir: str | None = None, owns_nodes: bool = True):
        check(len(addresses) >= 1, "addresses", list(addresses), "at least one NodeAddress")
        for name, v in (("timeout_s", timeout_s), ("connect_timeout_s", connect_timeout_s),
                        ("load_timeout_s", load_timeout_s)):
            check(isinstance(v, (int, float)) and v > 0, name, v, "a number of seconds > 0")
        self.addresses = list(addresses)
        self.owns_nodes = owns_nodes
        self.timeout_s, self.connect_timeout_s, self.load_timeout_s = timeout_s, connect_timeout_s, load_timeout_s
        self.job: JobSpec | None = None
        self.job_id = ""
        self.load_times: list[LoadTimes] = []
        self.shape_mechanisms: list[str] = []  # per rank, from the last shape(): "htb+nfqueue", ..., "none"
        self._stopped = False
        self.tls_dir = tls_dir
        creds = tls.channel_credentials(tls_dir, "orchestrator") if tls_dir else None
        self._channels = [tls.open_channel(a.control, CONTROL_CHANNEL_OPTIONS, creds) for a in self.addresses]
        self._stubs = [node_pb2_grpc.NodeStub(ch) for ch in self._channels]
        try:
            self._await_ready()
        except BaseException:
            self._close_channels()
            raise

    def _await_ready(self) -> None:
        deadline = time.monotonic() + self.connect_timeout_s
        for rank, ch in enumerate(self._channels):
            try:
                grpc.channel_ready_future(ch).result(timeout=max(0.0, deadline - time.monotonic()))
            except grpc.FutureTimeoutError:
                hint = ("; or it refuses this orchestrator's certificate (another experiment's CA?), or "
                        "serves no TLS" if self.tls_dir else "; a node started with --tls-dir answers TLS "
                        "clients only (Orchestrator tls_dir)")
                raise NodeError("connect", rank, self.addresses[rank].control,
                                f"no node answers within {self.connect_timeout_s:g} s{hint}") from None

    # -- the job ---------------------------------------------------------------
    def load(self, job: JobSpec, codebooks: bytes | None = None) -> list[LoadTimes]:
        """Load ``job`` on every node (replacing any previous job). Returns per-rank build and connect times.
        ``codebooks``: the bytes of the job's codebook file, sent along to nodes that do not share files."""
        self._check_running()
        n = len(self.addresses)
        check(job.world_size == n, "world_size", job.world_size, f"{n} (the number of node addresses)")
        job_id = uuid.uuid4().hex[:12]
        peers = [a.data for a in self.addresses]
        wait_s = self.PEER_WAIT_FRACTION * self.timeout_s
        requests = [serde.load_request(LoadArgs(job_id, job, r, peers, comm_timeout_s=wait_s,
                                                connect_timeout_s=self.connect_timeout_s, codebooks=codebooks))
                    for r in range(n)]
        calls = [lambda r=r: self._stubs[r].LoadJob.future(requests[r], timeout=self.load_timeout_s)
                 for r in range(n)]
        self.job, self.job_id = None, ""  # every node drops its previous job first
        replies = self._fan_out("load", calls)
        self.job, self.job_id = job, job_id
        self.load_times = [serde.read_load_response(r) for r in replies]
        return self.load_times

    def shape(self, links_by_rank: Sequence[dict[str, LinkProfile]]) -> list[float]:
        """Make every node shape its own links (nodes on real devices or in containers; see
        testbed.net.selfshape). ``links_by_rank[r]`` maps a peer's data host (as in the nodes'
        data addresses) to the profile of the direction rank r -> that peer, in device time;
        an empty mapping everywhere removes all shaping. Each node gets its share: the bandwidth
        of what it sends, the delay, jitter and loss of what it receives (``node_shares``).
        Replaces the previous shape() on every node; live, a job stays loaded. Returns each
        rank's seconds to apply; ``shape_mechanisms`` says how each applied it. A node refusing
        (no CAP_NET_ADMIN: FAILED_PRECONDITION, bad input) raises NodeError and, like a refused
        load, leaves the nodes running."""
        self._check_running()
        hosts = [split_hostport(a.data, "data address")[0] for a in self.addresses]
        requests = [serde.shape_request(share) for share in node_shares(list(links_by_rank), hosts)]
        calls = [lambda r=r: self._stubs[r].Shape.future(requests[r], timeout=self.SHAPE_RPC_S)
                 for r in range(len(self.addresses))]
        replies = [serde.read_shape_response(resp) for resp in self._fan_out("shape", calls)]
        self.shape_mechanisms = [m for _s, m in replies]
        return [s for s, _m in replies]

    def infer(self) -> InferenceResult:
        """One inference on every rank at once. Raises NodeError if any rank fails (and stops the nodes)."""
        self._check_running()
        if self.job is None:
            raise ConfigError("job", None, "a job loaded with Orchestrator.load() before infer()")
        req = serde.infer_request(self.job_id)
        calls = [lambda r=r: self._stubs[r].Infer.future(req, timeout=self.timeout_s)
                 for r in range(len(self.addresses))]
        t0 = time.perf_counter()
        replies = self._fan_out("infer", calls)
        latency_s = time.perf_counter() - t0
        nodes = [serde.read_infer_response(resp, self.addresses[r].control) for r, resp in enumerate(replies)]
        output = next((n.output for n in nodes if n.output is not None), None)
        return InferenceResult(output=output, latency_s=latency_s, nodes=nodes)

    def stats(self, data_hosts: Sequence[str] | None = None) -> list[NodeStats]:
        """Every node's stats; ``data_hosts``: per rank, the IP its peers reach it at (the node then
        reports that interface's byte counters)."""
        self._check_running()
        hosts = list(data_hosts) if data_hosts is not None else [""] * len(self.addresses)
        calls = [lambda r=r: self._stubs[r].Stats.future(serde.stats_request(hosts[r]), timeout=self.connect_timeout_s)
                 for r in range(len(self.addresses))]
        return [serde.read_stats_response(r) for r in self._fan_out("stats", calls)]

    def probe(self, runs: int = PROBE_RUNS) -> list[float]:
        """Every node's host probe (testbed.models.probe) timed in its own process, all at once (as
        the devices compute during an inference): median CPU seconds per block, in rank order. Call
        it between inferences; a node that refuses or cannot answer raises NodeError and leaves the
        nodes as they are unless it died."""
        self._check_running()
        req = serde.probe_request(runs)
        calls = [lambda r=r: self._stubs[r].Probe.future(req, timeout=self.PROBE_RPC_S)
                 for r in range(len(self.addresses))]
        return [serde.read_probe_response(resp) for resp in self._fan_out("probe", calls)]

    # -- fan-out and failure ------------------------------------------------------
    def _fan_out(self, phase: str, calls: list[Callable[[], grpc.Future]]) -> list:
        """Start every call, wait for all. On the first failure, give the others a moment to
        report (to find the root cause), stop every node, and raise NodeError."""
        done: queue.SimpleQueue = queue.SimpleQueue()
        futures = []
        for rank, call in enumerate(calls):
            fut = call()
            fut.add_done_callback(lambda _f, r=rank: done.put(r))
            futures.append(fut)
        pending = set(range(len(futures)))
        failed: dict[int, grpc.RpcError] = {}
        grace_until = None
        while pending:
            wait = None if grace_until is None else max(0.0, grace_until - time.monotonic())
            try:
                rank = done.get(timeout=wait)
            except queue.Empty:
                break  # grace over: the others are still waiting on the failed rank
            pending.discard(rank)
            err = futures[rank].exception()
            if err is not None:
                failed[rank] = err
                grace_until = grace_until or time.monotonic() + min(self.GRACE_S, 0.1 * self.timeout_s)
        if failed:
            for fut in futures:
                fut.cancel()
            raise self._failure(phase, failed, sorted(pending))
        return [f.result() for f in futures]

    def _failure(self, phase: str, failed: dict[int, grpc.RpcError], silent: list[int]) -> NodeError:
        """The root cause among the failed ranks, and the ``silent`` ones still not answering."""
        def what(err: grpc.RpcError) -> str:
            code = err.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                return f"node unreachable or died ({err.details()})"
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return "no reply within the deadline"
            return f"{code.name}: {err.details()}"

        primary = [r for r, e in failed.items() if e.code() not in _SECONDARY]
        if primary:
            root, root_what = min(primary), what(failed[min(primary)])
        elif silent and phase not in _REJECTABLE:  # every failure only lost a peer, and a rank never answered
            root, root_what = silent[0], "no reply while its peers failed waiting for it (hung or overloaded?)"
        else:
            root = min(failed)
            root_what = what(failed[root])
        others = "; ".join(f"rank {r}: {what(e)}" for r, e in sorted(failed.items()) if r != root)
        # A failed inference stops every node (nothing may be left waiting); nodes the orchestrator
        # does not own are unloaded instead. A load or shape that the nodes rejected (bad job,
        # unreachable peer, no CAP_NET_ADMIN) leaves them healthy; only a node that died or hung
        # then stops (unloads) them all.
        if phase not in _REJECTABLE or any(e.code() in _GONE for e in failed.values()):
            if self.owns_nodes:
                self.shutdown(f"{phase} failed on rank {root}")
            else:
                self.release(f"{phase} failed on rank {root}")
        return NodeError(phase, root, self.addresses[root].control, root_what, others)

    def _check_running(self) -> None:
        if self._stopped:
            raise CommError("the orchestrator has stopped its nodes; start new ones")

    # -- stopping ------------------------------------------------------------------
    def shutdown(self, reason: str = "orchestrator shutdown", wait_s: float = 3.0) -> None:
        """Ask every node to stop, wait up to ``wait_s`` until none answers. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        req = serde.shutdown_request(reason)
        futs = [stub.Shutdown.future(req, timeout=self.STOP_RPC_S) for stub in self._stubs]
        for fut in futs:
            try:
                fut.result()
            except grpc.RpcError:
                pass  # already gone
        deadline = time.monotonic() + wait_s
        for stub in self._stubs:
            while time.monotonic() < deadline:
                try:
                    stub.Stats(serde.stats_request(), timeout=0.5)
                except grpc.RpcError:
                    break  # stopped serving
                time.sleep(0.05)
        self._close_channels()

    def release(self, reason: str = "orchestrator done") -> None:
        """Unload every node's job and let go of the nodes, which keep serving (a node that
        cannot answer within STOP_RPC_S is left as it is). Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        req = serde.unload_request(reason)
        futs = [stub.Unload.future(req, timeout=self.STOP_RPC_S + 5.0) for stub in self._stubs]
        for fut in futs:
            try:
                fut.result()
            except grpc.RpcError:
                pass  # gone or frozen: nothing more to ask of it
        self._close_channels()

    def disconnect(self) -> None:
        """Let go of the nodes without asking them anything (they keep their job, if any). Idempotent."""
        self._stopped = True
        self._close_channels()

    def _close_channels(self) -> None:
        for ch in self._channels:
            ch.close()

    def __enter__(self) -> "Orchestrator":
        return self

    def __exit__(self, *exc) -> None:
        if self.owns_nodes:
            self.shutdown()
        else:
            self.release()
