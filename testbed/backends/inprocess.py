"""The ``inprocess`` backend: N ranks as threads of the runner's process, no network.

It runs the real methods through ``testbed.comm.InProcessGroup`` (the same
Communicator algorithms and schedule traces as over gRPC), so results carry real
compute times, application bytes and agreement, but no link effects: it accepts
only an unshaped profile. It is what tests and users without root run, and it
gives the same per-inference record as the gRPC orchestrator (InferenceResult).

Ranks are threads sharing the interpreter: torch releases the GIL inside its
kernels, but N ranks on few cores contend, so compute times here are those of
N concurrent ranks on this host (the gRPC backends pin a process per rank).
"""

from __future__ import annotations

import time

import torch

from testbed.backends.base import Backend, BackendSetup
from testbed.comm.inprocess import InProcessGroup, run_ranks, signals_held
from testbed.comm.trace import Trace
from testbed.errors import CommError, ConfigError
from testbed.methods.job import JobSpec, RankRunner
from testbed.net.profile import LinkProfile
from testbed.node.memory import process_memory
from testbed.node.records import InferenceResult, LoadTimes, RankResult


class InProcessBackend(Backend):
    """load(job) builds every rank's shard once; infer() runs one inference on N threads."""

    name = "inprocess"
    mechanism = "none"
    shapes_links = False

    def __init__(self, timeout_s: float = 120.0) -> None:
        self.timeout_s = timeout_s
        self.world_size = 0
        self.runners: list[RankRunner] = []
        self.group: InProcessGroup | None = None
        self.load_times: list[LoadTimes] = []

    @classmethod
    def from_setup(cls, setup: BackendSetup) -> "InProcessBackend":
        return cls(setup.timeout_s)

    def start(self, n_nodes: int) -> None:
        self.world_size = n_nodes

    def apply_profile(self, profile: LinkProfile) -> None:
        unshaped = LinkProfile()
        for f in ("bandwidth_mbps", "delay_ms", "jitter_ms", "loss_pct"):
            if getattr(profile, f) != getattr(unshaped, f):
                raise ConfigError(f, getattr(profile, f), "unshaped only with backend inprocess; use mininet or sim")

    def load(self, job: JobSpec) -> None:
        if job.world_size != self.world_size:
            raise ConfigError("world_size", job.world_size, f"{self.world_size} (the ranks started)")
        self._drop_job()
        # set once for the process: every rank thread uses the job's intra-op thread count
        torch.set_num_threads(job.threads)
        self.group = InProcessGroup(job.world_size, self.timeout_s)
        t0 = time.perf_counter()
        self.runners = [RankRunner(job, r, self.group.communicator(r)) for r in range(job.world_size)]
        # every rank lives in this process: one figure for all of them (the runner's own share included)
        rss_kib, pss_kib = process_memory()
        self.load_times = [LoadTimes(time.perf_counter() - t0, 0.0, rss_kib, pss_kib)]

    def infer(self, repetition: int | None = None) -> InferenceResult:
        if not self.runners or self.group is None:
            raise CommError("no job loaded: call load(job) first")
        if self.group.aborted.is_set():
            raise CommError("the in-process group was aborted by an earlier failure; load the job again")
        runners, group = self.runners, self.group  # the rank threads keep theirs if close() drops the job
        t0 = time.perf_counter()
        outs = run_ranks(self.world_size, lambda r: runners[r].infer(), group.aborted.set, name="inprocess-rank",
                         stop_s=self.timeout_s)
        latency = time.perf_counter() - t0
        nodes = [self._record(runners[r], r, *outs[r]) for r in range(self.world_size)]
        nodes[0].rss_kib, nodes[0].pss_kib = process_memory()  # one process holds every rank: said once
        return InferenceResult(next((o for o, _ in outs if o is not None), None), latency, nodes)

    @staticmethod
    def _record(runner: RankRunner, rank: int, output, wall_s: float) -> RankResult:
        tr = runner.comm.trace
        return RankResult(rank=rank, output=output, wall_s=wall_s, compute_s=tr.compute_s, comm_s=tr.comm_s,
                          wait_s=tr.wait_s, serialize_s=tr.serialize_s, bytes_sent=tr.bytes_sent,
                          bytes_recv=tr.bytes_recv, trace=Trace.from_dict(tr.to_dict()),  # the next inference reuses tr
                          address=f"inprocess:{rank}", token_times_s=list(runner.token_times_s),
                          generated=runner.generated)

    def _drop_job(self) -> None:
        group, self.runners, self.group = self.group, [], None
        if group is not None:
            with signals_held():  # Ctrl-C landing inside set() would leave the event's lock held
                group.aborted.set()

    def close(self) -> None:
        self._drop_job()
        self.world_size = 0
