"""The ``inprocess`` backend: N ranks as threads of the runner's process, no network.

It runs the real methods through ``testbed.comm.InProcessGroup`` (the same
Communicator algorithms and schedule traces as over gRPC), so results carry real
compute times, application bytes and agreement, but no link effects: it accepts
only an unshaped profile. It is what tests and users without root run, and it
gives the same per-inference record as the gRPC orchestrator
(``InferenceResult`` of ``testbed.node.records.RankResult`` per rank).

Ranks are threads sharing the interpreter: torch releases the GIL inside its
kernels, but N ranks on few cores contend, so compute times here are those of
N concurrent ranks on this host (the gRPC backends pin a process per rank).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from testbed.backends.base import Backend, NodeAddress
from testbed.comm.inprocess import InProcessGroup
from testbed.errors import CommError, ConfigError
from testbed.methods.job import JobSpec, RankRunner
from testbed.net.profile import LinkProfile
from testbed.node.records import RankResult


@dataclass
class InferenceResult:
    """One inference of a job: the output (from the rank that holds it), client-observed latency, per-rank records."""

    output: torch.Tensor | None
    latency_s: float
    nodes: list[RankResult] = field(default_factory=list)


class InProcessBackend(Backend):
    name = "inprocess"
    mechanism = "none"

    def __init__(self) -> None:
        self.n_nodes = 0

    def start(self, n_nodes: int) -> list[NodeAddress]:
        self.n_nodes = n_nodes
        return [NodeAddress(f"inprocess:{r}", f"inprocess:{r}") for r in range(n_nodes)]

    def apply_profile(self, profile: LinkProfile) -> None:
        unshaped = LinkProfile()
        for f in ("bandwidth_mbps", "delay_ms", "jitter_ms", "loss_pct"):
            if getattr(profile, f) != getattr(unshaped, f):
                raise ConfigError(f, getattr(profile, f), "unshaped only with backend inprocess; use mininet or sim")

    def client(self, addresses: list[NodeAddress], timeout_s: float) -> "InProcessCluster":
        """What the runner talks to instead of a gRPC Orchestrator (same load/infer/shutdown surface)."""
        return InProcessCluster(len(addresses), timeout_s)

    def close(self) -> None:
        self.n_nodes = 0


class InProcessCluster:
    """load(job) builds every rank's shard once; infer() runs one inference on N threads."""

    def __init__(self, world_size: int, timeout_s: float):
        self.world_size, self.timeout_s = world_size, timeout_s
        self.runners: list[RankRunner] = []
        self.group: InProcessGroup | None = None

    def load(self, job: JobSpec) -> None:
        if job.world_size != self.world_size:
            raise ConfigError("world_size", job.world_size, f"{self.world_size} (the nodes started)")
        self.shutdown()
        # set once for the process: every rank thread uses the job's intra-op thread count
        torch.set_num_threads(job.threads)
        self.group = InProcessGroup(job.world_size, self.timeout_s)
        self.runners = [RankRunner(job, r, self.group.communicator(r)) for r in range(job.world_size)]

    def infer(self) -> InferenceResult:
        if not self.runners or self.group is None:
            raise CommError("no job loaded: call load(job) first")
        if self.group.aborted.is_set():
            raise CommError("the in-process group was aborted by an earlier failure; load the job again")
        n = self.world_size
        outs: list = [None] * n
        errors: list[BaseException | None] = [None] * n

        def body(r: int) -> None:
            try:
                outs[r] = self.runners[r].infer()
            except BaseException as e:  # noqa: BLE001 - reported below, after every rank stopped
                errors[r] = e
                self.group.aborted.set()

        threads = [threading.Thread(target=body, args=(r,), name=f"inprocess-rank{r}", daemon=True) for r in range(n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except BaseException:  # interrupted (Ctrl-C, SIGTERM): make the ranks stop at their next message
            self.group.aborted.set()
            raise
        latency = time.perf_counter() - t0
        real = [e for e in errors if e is not None and "group aborted" not in str(e)]
        first = real[0] if real else next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return InferenceResult(next((o for o, _ in outs if o is not None), None), latency,
                               [self._record(r, *outs[r]) for r in range(n)])

    def _record(self, rank: int, output, wall_s: float) -> RankResult:
        tr = self.runners[rank].comm.trace
        return RankResult(rank=rank, output=output, wall_s=wall_s, compute_s=tr.compute_s, comm_s=tr.comm_s,
                          wait_s=tr.wait_s, serialize_s=tr.serialize_s, bytes_sent=tr.bytes_sent,
                          bytes_recv=tr.bytes_recv, trace=_copy(tr), address=f"inprocess:{rank}")

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.aborted.set()
        self.runners, self.group = [], None


def _copy(trace):
    """A snapshot: the communicator reuses its Trace object for the next inference."""
    from testbed.comm.trace import Trace

    return Trace.from_dict(trace.to_dict())
