"""Plain records exchanged between the node server and the orchestrator (no protobuf here).

testbed.node.serde converts them to and from the wire messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from testbed.comm.trace import Trace
from testbed.methods.job import JobSpec

#: the version of the node's wire protocol (protos/*.proto and what the messages mean): bumped
#: whenever they change; an orchestrator refuses nodes that report another one
PROTOCOL_VERSION = 3


@dataclass(frozen=True)
class NodeAddress:
    """Where one node server is reached; a backend hands these out in rank order."""

    control: str  # host:port the orchestrator uses (never shaped)
    data: str  # host:port peers use for the data plane (shaped under emulation)


@dataclass
class LoadArgs:
    """What one node needs to load its rank of a job."""

    job_id: str
    job: JobSpec
    rank: int
    peers: list[str]  # data-plane host:port by rank, this node's own entry included
    comm_timeout_s: float  # deadline of every wait for a peer's message
    connect_timeout_s: float  # deadline for reaching every peer at load
    codebooks: bytes | None = None  # astra codebook file's bytes, shipped to nodes that do not share files


@dataclass
class LoadTimes:
    """What loading a job took on one node, and the node's memory once the job was built."""

    build_s: float  # model, method and input, seconds
    connect_s: float  # peer streams, seconds
    rss_kib: int = 0  # resident set of the node process after the load (VmRSS); 0: unknown
    pss_kib: int | None = None  # proportional set size (pages shared by k processes count 1/k); None: unreadable


@dataclass
class RankResult:
    """One rank's share of one inference. Times in seconds, bytes are application payload."""

    rank: int
    output: torch.Tensor | None  # only on ranks that hold an output
    wall_s: float  # the rank's forward pass
    compute_s: float  # time outside collectives
    comm_s: float  # time inside collectives
    wait_s: float  # part of comm_s blocked on peers' data
    serialize_s: float  # part of comm_s turning tensors into bytes and back
    bytes_sent: int
    bytes_recv: int
    trace: Trace = field(repr=False)
    address: str = ""  # control address of the node (filled in by the orchestrator)
    # decode after prefill (job.generate > 0): seconds from the start of the inference to each
    # generated token (the first is the time to first token); token ids [B, generate] where the
    # output is held. Empty / None for prefill-only jobs.
    token_times_s: list[float] = field(default_factory=list)
    generated: torch.Tensor | None = None
    # the node process's memory right after the inference (testbed.node.memory), KiB: pages of a
    # read-only mapped checkpoint are resident once an inference has read them
    rss_kib: int = 0  # VmRSS; 0: unknown
    pss_kib: int | None = None  # proportional set size; None: unreadable


@dataclass
class InferenceResult:
    """One inference of a job, whatever ran it (node servers, in-process ranks, the simulator)."""

    output: torch.Tensor | None  # from the lowest rank that holds one (None: nothing was computed)
    latency_s: float  # client-observed: from sending the requests to the last rank's reply
    nodes: list[RankResult] = field(default_factory=list)  # per rank, in rank order (times, bytes, trace)

    @property
    def bytes_sent(self) -> int:
        """Application payload bytes sent by all ranks together."""
        return sum(n.bytes_sent for n in self.nodes)


@dataclass
class NodeStats:
    pid: int
    listen_addresses: list[str]
    job_id: str  # "" when no job is loaded
    rank: int  # -1 when no job is loaded
    inferences: int  # completed since the job was loaded
    uptime_s: float
    max_rss_kib: int  # peak resident memory of the node process
    # what the node runs and on what (testbed.node.host); the orchestrator checks the versions
    package_version: str = ""
    protocol_version: int = 0
    hostname: str = ""
    kernel: str = ""
    cpu_model: str = ""
    cpu_count: int = 0
    data_interface: str = ""  # the interface carrying the data host the Stats request named ("": not found)
    tx_bytes: int | None = None  # its byte counters (None: unreadable)
    rx_bytes: int | None = None
    net_id: str = ""  # the machine and network namespace of the counters (testbed.node.host.net_id)
