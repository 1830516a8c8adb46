"""Network model of the simulator: topology as data, wire overhead, first-order TCP.

Everything here is pure (no SimPy): the engine asks a ``Network`` for the path of a
message and asks ``WireModel`` / ``TcpModel`` what a message costs. Splitting it
this way lets tests check each formula by hand. The cost formulas (``WireModel``'s
sizes, ``wire_bytes_with_loss``, ``tcp_stall_s``, ``slow_start_extra_s``,
``mathis_rate_bps``) work on numbers and on numpy arrays alike: the SimPy replay
(engine.py) calls them per message, the lock-step replay (lockstep.py) per batch.

A ``Network`` is built from a ``SimTopology`` (a kind and a node count: any N) or
from a ``testbed.net.topology.Topology`` (the Mininet engineer's YAML topologies,
with their sweep mapping). The kinds follow topologies/*.yaml, so that the same
sweep profile means the same path in emulation and in simulation:

- ``star``: every host has an access link to one switch, shaped both ways with
  the profile's bandwidth and half its delay, jitter and loss (``sweep: half``).
  A message a->b crosses a's uplink then b's downlink: its path has the
  profile's delay and loss, and it shares a's uplink and b's downlink.
- ``mesh``: one dedicated link per ordered host pair with the profile: one hop.
- ``line``: hosts 0..N-1 on a chain of links with the profile; a message crosses
  every link in between (delays add up, losses compound).
- ``shared_medium``: one channel carries every transmission (one Wi-Fi cell):
  one transmitter at a time, one hop with the profile.

A message uses a hop as a fluid pipe (cut-through): the hops of a path carry it
at the same time, the last bit leaves a hop no earlier than it entered it.
Each hop serves messages first come, first served (see engine.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from testbed.errors import ConfigError, check
from testbed.net.profile import LinkProfile
from testbed.net.topology import half_profile

KINDS = ("star", "mesh", "line", "shared_medium")


@dataclass(frozen=True)
class SimTopology:
    """A topology the simulator can build: ``kind`` with ``n_nodes`` hosts, one profile on every link."""

    kind: str
    n_nodes: int
    profile: LinkProfile = field(default_factory=LinkProfile)

    def __post_init__(self) -> None:
        check(self.kind in KINDS, "topology", self.kind, " | ".join(KINDS))
        check(isinstance(self.n_nodes, int) and not isinstance(self.n_nodes, bool) and self.n_nodes >= 1,
              "nodes", self.n_nodes, "an integer >= 1")
        check(isinstance(self.profile, LinkProfile), "profile", self.profile, "a testbed.net.profile.LinkProfile")


@dataclass(frozen=True)
class Hop:
    """One shaped link a message crosses. ``resource`` names what it queues on."""

    resource: str
    bandwidth_bps: float | None  # None: unshaped (no serialization time)
    delay_s: float  # one-way propagation (mean)
    jitter_s: float
    loss: float  # probability a packet is lost on this hop, 0..1


def _hop(resource: str, p: LinkProfile) -> Hop:
    bw = None if p.bandwidth_mbps is None else float(p.bandwidth_mbps) * 1e6
    return Hop(resource, bw, p.delay_ms / 1e3, p.jitter_ms / 1e3, p.loss_pct / 100.0)


def _kind_path(topo: SimTopology, half: LinkProfile, a: int, b: int, memo: dict[str, Hop]) -> tuple[Hop, ...]:
    def hop(name: str, p: LinkProfile) -> Hop:  # one Hop per link, shared by every path over it
        h = memo.get(name)
        if h is None:
            h = memo[name] = _hop(name, p)
        return h

    kind, p = topo.kind, topo.profile
    if kind == "star":
        return (hop(f"up{a}", half), hop(f"down{b}", half))
    if kind == "mesh":
        return (hop(f"link{a}->{b}", p),)
    if kind == "shared_medium":
        return (hop("medium", p),)
    step = 1 if b > a else -1  # line
    return tuple(hop(f"link{i}->{i + step}", p) for i in range(a, b, step))


class Network:
    """Paths between the hosts (ranks 0..n-1) of a topology.

    ``topology`` is a ``SimTopology``, or a ``testbed.net.topology.Topology`` whose
    first ``nodes`` hosts are the ranks; ``profile`` (a sweep cell's) is then mapped
    onto its links and mediums by the topology's own ``sweep`` modes. Each direction
    of a link is one hop; a switch's ``medium`` is one more hop shared by every frame
    entering the switch. Unshaped hops without delay or loss cost nothing and are
    left out.
    """

    def __init__(self, topology, nodes: int | None = None, profile: LinkProfile | None = None):
        self._paths: dict[tuple[int, int], tuple[Hop, ...]] = {}
        self.kind: SimTopology | None = None  # the SimTopology it was built from, if any
        if isinstance(topology, SimTopology):
            check(nodes in (None, topology.n_nodes), "nodes", nodes, f"{topology.n_nodes} (the topology's)")
            check(profile is None, "profile", profile, "None: a SimTopology carries its profile")
            self.n, self.name, self.kind = topology.n_nodes, topology.kind, topology
            half, memo = half_profile(topology.profile), {}
            self.half = half
            self._build = lambda a, b: _kind_path(topology, half, a, b, memo)
            return
        check(hasattr(topology, "host_names") and hasattr(topology, "with_sweep"), "topology", topology,
              "a SimTopology or a testbed.net.topology.Topology")
        nodes = len(topology.hosts) if nodes is None else nodes
        check(isinstance(nodes, int) and 1 <= nodes <= len(topology.hosts), "nodes", nodes,
              f"1..{len(topology.hosts)} (the hosts of topology {topology.name!r})")
        topo = topology.with_sweep(profile) if profile is not None else topology
        names = topo.host_names[:nodes]
        self.n, self.name = nodes, topo.name

        def build(a: int, b: int) -> tuple[Hop, ...]:
            hops = []
            for lk, frm in topo.path(names[a], names[b]):
                to = lk.b if frm == lk.a else lk.a
                hops.append(_hop(f"{frm}->{to}", lk.profile_from(frm)))
                sw = topo.switch(to)
                if sw is not None and sw.medium is not None:
                    hops.append(_hop(f"medium:{to}", sw.medium))
            return tuple(h for h in hops if h.bandwidth_bps is not None or h.delay_s or h.jitter_s or h.loss)

        self._build = build

    def path(self, src: int, dst: int) -> tuple[Hop, ...]:
        """Hops from host ``src`` to host ``dst`` in order."""
        if not (0 <= src < self.n and 0 <= dst < self.n) or src == dst:
            raise ConfigError("peer", (src, dst), f"two different ranks in [0, {self.n})")
        key = (src, dst)
        if key not in self._paths:
            self._paths[key] = self._build(src, dst)
        return self._paths[key]

    def one_way_s(self, src: int, dst: int) -> float:
        return sum(h.delay_s for h in self.path(src, dst))

    def rtt_s(self, src: int, dst: int) -> float:
        """Base round-trip time (no queueing, no serialization), seconds."""
        return self.one_way_s(src, dst) + self.one_way_s(dst, src)

    def bottleneck_bps(self, src: int, dst: int) -> float | None:
        rates = [h.bandwidth_bps for h in self.path(src, dst) if h.bandwidth_bps is not None]
        return min(rates) if rates else None

    def loss(self, src: int, dst: int) -> float:
        """Probability that a packet is lost somewhere on the path (losses on hops independent)."""
        keep = 1.0
        for h in self.path(src, dst):
            keep *= 1.0 - h.loss
        return 1.0 - keep


@dataclass(frozen=True)
class WireModel:
    """Bytes and fixed costs a message adds on top of its payload.

    Defaults follow gRPC over TCP/IPv4 on Ethernet as the node runtime uses it:
    per segment of ``mss_bytes`` payload, 52 bytes TCP/IP (with timestamps) + 14
    Ethernet (htb counts the Ethernet header); HTTP/2 DATA frames of 16 KiB with 9
    byte headers; per message a fixed header (serde header, protobuf fields, gRPC
    5-byte prefix) and a fixed time (stack and runtime latency, not link time);
    a stream never goes faster than ``stack_bytes_per_s`` of payload (the gRPC
    stack's own ceiling, what bounds unshaped links);
    one ACK segment (header only) per ``ack_every`` segments in the reverse
    direction, counted in bytes on the wire and as link occupancy: the replays
    charge a message's links with its ACK bytes too, which is where the ACKs of
    the equal traffic the other way go in the methods' schedules (every rank sends
    each peer as much as it receives from it; htb shapes ACKs like data).
    """

    mss_bytes: int = 1448
    segment_header_bytes: int = 66
    frame_bytes: int = 16384
    frame_header_bytes: int = 9
    message_header_bytes: int = 64
    per_message_s: float = 0.0
    ack_every: int = 2
    stack_bytes_per_s: float | None = None  # the transport's own ceiling per stream (None: no limit)

    def __post_init__(self) -> None:
        check(isinstance(self.mss_bytes, int) and self.mss_bytes >= 1, "mss_bytes", self.mss_bytes, "an integer >= 1")
        for name in ("segment_header_bytes", "frame_header_bytes", "message_header_bytes", "ack_every"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 0, name, v, "an integer >= 0")
        check(isinstance(self.frame_bytes, int) and self.frame_bytes >= 1, "frame_bytes", self.frame_bytes,
              "an integer >= 1")
        check(isinstance(self.per_message_s, (int, float)) and self.per_message_s >= 0, "per_message_s",
              self.per_message_s, "a number of seconds >= 0")
        r = self.stack_bytes_per_s
        check(r is None or (isinstance(r, (int, float)) and r > 0), "stack_bytes_per_s", r, "a number > 0 or null")

    @classmethod
    def none(cls) -> "WireModel":
        """No overhead at all: the wire carries exactly the payload (the paper's model)."""
        return cls(segment_header_bytes=0, frame_header_bytes=0, message_header_bytes=0, ack_every=0)

    def stack_extra_s(self, payload_bytes, wire_bytes, bottleneck_bps):
        """Time a message takes beyond its link time because the stack is slower than the path
        (``bottleneck_bps`` None or inf: unshaped)."""
        if self.stack_bytes_per_s is None:
            return 0.0
        bw = math.inf if bottleneck_bps is None else bottleneck_bps
        return np.maximum(0.0, payload_bytes / self.stack_bytes_per_s - wire_bytes * 8 / bw)

    def stream_bytes(self, payload_bytes):
        """Bytes of the TCP byte stream for one message: payload plus application framing."""
        framed = payload_bytes + self.message_header_bytes
        return framed + _ceil_div(framed, self.frame_bytes) * self.frame_header_bytes

    def segments(self, payload_bytes):
        n = _ceil_div(self.stream_bytes(payload_bytes), self.mss_bytes)
        return np.maximum(1, n) if isinstance(n, np.ndarray) else max(1, n)

    def wire_bytes(self, payload_bytes):
        """Bytes the message puts on the forward link (stream plus per-segment headers)."""
        return self.stream_bytes(payload_bytes) + self.segments(payload_bytes) * self.segment_header_bytes

    def ack_bytes(self, payload_bytes):
        """Bytes of ACKs the receiver sends back for the message."""
        if self.ack_every == 0:
            return 0 * payload_bytes
        return _ceil_div(self.segments(payload_bytes), self.ack_every) * self.segment_header_bytes


def _ceil_div(a, b):
    """ceil(a / b) for non-negative integers or integer arrays."""
    return -(-a // b)


TCP_MODES = ("steady", "slow_start")
#: RACK's reordering window in RTTs (Linux: min_rtt / 4) before a segment with a later one
#: acknowledged is marked lost
RACK_REORDER_RTT = 0.25
LOSS_MODES = ("expected", "sampled")


@dataclass(frozen=True)
class TcpModel:
    """First-order TCP: start-up and loss.

    ``mode``:
      - ``slow_start`` (default): each connection (ordered host pair, one
        persistent gRPC stream) starts with ``initial_window_segments`` and doubles
        per RTT until its window covers the bandwidth-delay product; after an idle
        gap longer than the RTO the window is halved once per RTO begun after the
        first, never below the initial one (``restart_window``: Linux's
        tcp_cwnd_restart with ``tcp_slow_start_after_idle=1``, RFC 2861). Within a
        busy inference (gaps shorter than 200 ms) windows stay open, so this mostly
        costs the first messages on a connection when the BDP exceeds 10 segments.
        ``warm`` (default): the replayed inference follows one of the same schedule
        (the runner's warm-up inference and the repetitions before it): each connection
        starts with the window and idle time the previous inference left it, as on
        nodes whose streams persist; False: every connection starts at the initial
        window (the first inference after the nodes start).
      - ``steady``: every message is sent at the bottleneck rate (no start-up).
    Slow start stretches a message's latency but not its link occupancy: the gaps
    between rounds can carry other flows of the same link.

    ``loss_mode`` (with path loss probability p per packet):
      - ``expected``: deterministic expected cost; ``sampled``: drawn per message
        from a seeded generator (repetitions differ like real runs do).
      Loss recovery is Linux's (RACK-TLP, the default since 4.18): a lost segment is
      marked lost once a segment sent after it is acknowledged, a quarter of an RTT
      later. So a loss before the last segment of a message costs its window halving
      only, taken as the Mathis et al. (1997) rate bound MSS/RTT * sqrt(3/(2p)); a lost
      *last* segment waits for the first of (``tail_loss_s``): the next segment the
      connection sends (acknowledged an RTT later), the tail loss probe (2 RTT +
      ``probe_floor_s``, for a message of more than one segment; with one segment in
      flight Linux waits an RTO instead) or the RTO, srtt + ``min_rto_s``; if that repair is
      lost too (p again), it costs the same once more (RACK marks a lost retransmission by
      later data as it does an original; one segment is then in flight). The replay
      does not look ahead, so it takes the connection's gap before this message as the
      time to its next one (lock-step schedules send on a connection once per block).
      Retransmitted bytes are added to the wire bytes (1/(1-p) in expectation).
    """

    mode: str = "slow_start"
    initial_window_segments: int = 10
    min_rto_s: float = 0.2
    loss_mode: str = "sampled"
    probe_floor_s: float = 0.002
    warm: bool = True

    def __post_init__(self) -> None:
        check(self.mode in TCP_MODES, "tcp_mode", self.mode, " | ".join(TCP_MODES))
        check(self.loss_mode in LOSS_MODES, "loss_mode", self.loss_mode, " | ".join(LOSS_MODES))
        check(isinstance(self.initial_window_segments, int) and self.initial_window_segments >= 1,
              "initial_window_segments", self.initial_window_segments, "an integer >= 1")
        check(isinstance(self.min_rto_s, (int, float)) and self.min_rto_s >= 0, "min_rto_s", self.min_rto_s,
              "a number of seconds >= 0")
        check(isinstance(self.probe_floor_s, (int, float)) and self.probe_floor_s >= 0, "probe_floor_s",
              self.probe_floor_s, "a number of seconds >= 0")
        check(isinstance(self.warm, bool), "warm", self.warm, "true or false")

    def rto_s(self, rtt_s):
        """Retransmission timeout for a path of round trip ``rtt_s`` (a number or an array): Linux's
        srtt + max(rttvar, rto_min), with a steady RTT (no variance)."""
        return rtt_s + self.min_rto_s

    def tail_loss_s(self, segments, rtt_s, gap_s):
        """What a lost last segment adds to a message of ``segments`` (``gap_s``: time until the
        connection sends again): repaired after the next segment's ACK plus RACK's reordering window,
        the tail loss probe, or the RTO, whichever fires first."""
        rto = self.rto_s(rtt_s)
        probe = _minimum(rto, 2 * rtt_s + self.probe_floor_s)
        probe = _where(segments > 1, probe, rto)  # one segment in flight: the probe waits an RTO
        return _minimum(probe, _maximum(gap_s, 0.0) + (1 + RACK_REORDER_RTT) * rtt_s)  # < 0: still sending


Draw = Callable[[Any, Any], Any]  # (trials, probability) -> number of successes (numbers or arrays)


def _where(cond, a, b):
    """np.where for arrays; a plain choice for numbers (the per-message replay stays cheap)."""
    return np.where(cond, a, b) if isinstance(cond, np.ndarray) else (a if cond else b)


def _maximum(a, b):
    return np.maximum(a, b) if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) else max(a, b)


def _minimum(a, b):
    return np.minimum(a, b) if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) else min(a, b)


def _any(x) -> bool:
    return bool(x.any()) if isinstance(x, np.ndarray) else bool(x)


def wire_bytes_with_loss(tcp: TcpModel, segments, wire_bytes, loss, draw: Draw):
    """Bytes a message occupies its links with, retransmitted segments included (path loss ``loss``)."""
    if tcp.loss_mode == "expected":
        return wire_bytes / (1.0 - loss)
    return wire_bytes + draw(segments, loss) * wire_bytes / segments


def tcp_stall_s(tcp: TcpModel, wire: WireModel, segments, wire_bytes, rtt_s, bottleneck_bps, loss, cwnd, idle_s,
                draw: Draw):
    """Latency TCP adds to a message beyond its link time: slow start, then loss recovery.

    ``bottleneck_bps`` inf: unshaped. ``cwnd``: the connection's window before the message (used
    in ``slow_start`` mode), ``idle_s``: time since its last message left (an idle gap longer than
    the RTO shrinks the window, ``restart_window``; under loss, the expected time to its next message).
    Returns (stall seconds, window afterwards).
    """
    rto = tcp.rto_s(rtt_s)
    stall = 0.0
    if tcp.mode == "slow_start":
        cwnd = restart_window(cwnd, idle_s, rto, tcp.initial_window_segments)
        seg_rate = bottleneck_bps / (8 * (wire.mss_bytes + wire.segment_header_bytes))
        stall, cwnd = slow_start_extra_s(segments, cwnd, rtt_s, seg_rate)
    if _any(loss > 0):
        # the last segment lost; its repair (probe or retransmission) lost too, repaired the same way
        if tcp.loss_mode == "expected":
            tail, again = loss, loss
        else:
            tail, again = draw(1, loss), draw(1, loss)
        stall = stall + tail * (tcp.tail_loss_s(segments, rtt_s, idle_s) + again * tcp.tail_loss_s(1, rtt_s, idle_s))
        m = mathis_rate_bps(wire.mss_bytes, rtt_s, loss)
        stall = stall + _where(m < bottleneck_bps, wire_bytes * 8 / m - wire_bytes * 8 / bottleneck_bps, 0.0)
    return stall, cwnd


def restart_window(cwnd, idle_s, rto_s, initial_segments: int):
    """The window a connection sends with after ``idle_s`` without sending (Linux's tcp_cwnd_restart):
    unchanged up to one RTO, then halved once per further RTO begun, never below min(initial, cwnd)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        halvings = np.ceil(np.asarray(idle_s, dtype=float) / rto_s) - 1.0
    halvings = np.where(np.asarray(idle_s) > rto_s, np.minimum(halvings, 64.0), 0.0)
    floor = np.minimum(np.asarray(cwnd, dtype=float), float(initial_segments))
    out = np.maximum(floor, np.asarray(cwnd, dtype=float) / 2.0 ** halvings)
    return out if isinstance(cwnd, np.ndarray) or isinstance(idle_s, np.ndarray) else float(out)


def slow_start_extra_s(segments, cwnd, rtt_s, rate_segments_per_s):
    """Extra time over steady-state sending of ``segments`` starting from window ``cwnd``.

    Round i sends ``cwnd * 2**i`` segments and waits one RTT for their ACKs, until the
    window reaches the bandwidth-delay product (then the pipe is full and the rest
    goes at ``rate``; None or inf: unshaped). Returns (extra seconds, window afterwards in segments).
    """
    rate = math.inf if rate_segments_per_s is None else rate_segments_per_s
    with np.errstate(invalid="ignore"):
        bdp = rate * rtt_s  # nan: unshaped without delay, no pipe to fill
    bdp = np.where(np.isnan(bdp), math.inf, bdp) if isinstance(bdp, np.ndarray) else (math.inf if bdp != bdp else bdp)
    w = cwnd.astype(float) if isinstance(cwnd, np.ndarray) else float(cwnd)
    sent, rounds = 0.0 * w, 0.0 * w
    while True:
        go = (w < bdp) & (sent + w < segments)
        if not _any(go):
            break
        sent, rounds, w = sent + go * w, rounds + go * rtt_s, _where(go, 2 * w, w)
    return _maximum(0.0, rounds - sent / rate), w


def mathis_rate_bps(mss_bytes: int, rtt_s, loss):
    """Steady-state TCP throughput bound under random loss (Mathis et al. 1997), bits/s (inf without loss)."""
    ok = (loss > 0) & (rtt_s > 0)
    rate = mss_bytes * 8 / _where(ok, rtt_s, 1.0) * (1.5 / _where(ok, loss, 1.0)) ** 0.5
    return _where(ok, rate, math.inf)
