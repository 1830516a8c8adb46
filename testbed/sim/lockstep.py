"""Vectorized replay of lockstep schedules: the engine.py model, one collective at a time in numpy.

Every method of this testbed makes every rank call the same collectives in the same
order, each an all-gather or a (ring or direct) all-reduce of the Communicator; their message
patterns are the Communicator's own plans (comm/base.py), read here, not re-derived.
For such schedules the replay needs no event per message: all messages of one
all-gather, or of one ring step, go through the hops of their paths together.
Per hop, messages are served first come first served exactly as in engine.py
(start = max(arrival, link free), end = max(start + size/rate, upstream end)); the
sequential recursion is evaluated in closed form per link with cumulative sums and
running maxima (end_k = S_k + max(free, max_{m<=k}(b_m - S_m)), S the cumulative
transmission times, b_m = max(arrival_m + size_m, upstream_end_m)).

It is the same model as the SimPy replay with one difference: a link serves the
messages of collective k only after those of collective k-1 (the SimPy replay
interleaves them by arrival when a link is still busy with the previous one).
Tests check both replays agree on the methods' schedules. It applies where every
link is used at one hop position only (star, mesh, shared medium, edge_cloud-like
trees); elsewhere (line) and for other schedules, ``simulate`` uses the SimPy replay.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import numpy as np

from testbed.comm.base import all_gather_plan, all_reduce_plan, direct_all_reduce_plan, peers, plan_ops
from testbed.comm.trace import Collective, Compute, Trace
from testbed.sim.network import Network, TcpModel, WireModel, tcp_stall_s, wire_bytes_with_loss


@dataclass(frozen=True)
class Lockstep:
    """A schedule whose ranks all run the same collectives: per collective k, compute[k] runs first."""

    compute: np.ndarray  # [K+1, N] seconds on this host before collective k (last row: after the last)
    serialize: np.ndarray  # [K, N] seconds inside collective k
    colls: tuple[tuple[str, np.ndarray], ...]  # ("all_gather", bytes per rank) | ("ring" | "direct", bytes per chunk)

    @property
    def n(self) -> int:
        return self.compute.shape[1]


def compile_lockstep(traces: list[Trace]) -> Lockstep | None:
    """The lockstep form of per-rank traces, or None if they are not (then the SimPy replay runs)."""
    n = len(traces)
    per_rank = [t.collectives() for t in traces]
    if len({len(c) for c in per_rank}) != 1:
        return None
    comp = np.zeros((len(per_rank[0]) + 1, n))
    for r, tr in enumerate(traces):
        k = 0
        for ev in tr.events:
            if isinstance(ev, Compute):
                comp[k, r] += ev.duration_s
            else:
                k += 1
    colls, ser = [], np.zeros((len(per_rank[0]), n))
    for k in range(len(per_rank[0])):
        cs = [c[k] for c in per_rank]
        ser[k] = [c.serialize_s for c in cs]
        coll = _pattern(cs, n)
        if coll is None:
            return None
        colls.append(coll)
    return Lockstep(comp, ser, tuple(colls))


@functools.lru_cache(maxsize=64)
def _plan_ops(pattern: str, n: int, sizes: tuple[int, ...]) -> tuple[list, ...]:
    """Every rank's trace ops of one collective pattern with these sizes (cached: the collectives of a
    schedule repeat, and at hundreds of ranks building the plans is what compiling costs)."""
    plan = _PLANS[pattern]
    return tuple(plan_ops(plan(r, n), list(sizes)) for r in range(n))


def _pattern(cs: list[Collective], n: int) -> tuple[str, np.ndarray] | None:
    """("all_gather", bytes per rank) or ("ring" | "direct", bytes per chunk) if rank r's ops are
    exactly the Communicator's plan for rank r with those sizes; None otherwise."""
    if all(not c.ops for c in cs):
        return ("none", np.zeros(0))
    if n < 2:
        return None
    if all(c.kind == "all_gather" for c in cs):
        candidates = [("all_gather", [c.ops[0][2] if c.ops else 0 for c in cs])]  # each rank's own: first send
    elif all(c.kind == "all_reduce" for c in cs):
        candidates = []
        for pattern in ("ring", "direct"):
            sizes = [0] * n
            for m, op in zip(_PLANS[pattern](0, n), cs[0].ops):  # every chunk leaves rank 0 (at least) once
                if m.op == "send":
                    sizes[m.part] = op[2]
            candidates.append((pattern, sizes))
    else:
        return None
    for pattern, sizes in candidates:
        want = _plan_ops(pattern, n, tuple(sizes))
        if all(c.ops == want[r] for r, c in enumerate(cs)):
            return (pattern, np.array(sizes, dtype=np.int64))
    return None


_PLANS = {"all_gather": all_gather_plan, "ring": all_reduce_plan, "direct": direct_all_reduce_plan}


class NotLockstepNetwork(Exception):
    """A link is used at different hop positions by different paths (e.g. a line): use the SimPy replay."""


class _Paths:
    """Per ordered pair: hop resources, rates, delays as [N, N, H] arrays (built once per Network)."""

    def __init__(self, net: Network):
        n = net.n
        if getattr(net, "kind", None) is not None and net.kind.kind == "star":
            self._star(net)
            return
        paths = {(a, b): net.path(a, b) for a in range(n) for b in range(n) if a != b}
        self.h = max((len(p) for p in paths.values()), default=0)
        names: dict[str, int] = {}
        level: dict[str, int] = {}
        shape = (n, n, max(self.h, 1))
        self.res = np.zeros(shape, dtype=np.int64)
        self.valid = np.zeros(shape, dtype=bool)
        self.inv_bps = np.zeros(shape)  # 1 / rate (0: unshaped)
        self.delay, self.jitter, keep = np.zeros(shape), np.zeros(shape), np.ones(shape)
        bps = np.full(shape, np.inf)
        for (a, b), hops in paths.items():
            for k, hop in enumerate(hops):
                if level.setdefault(hop.resource, k) != k:
                    raise NotLockstepNetwork(f"{hop.resource} is used at several hop positions")
                self.res[a, b, k] = names.setdefault(hop.resource, len(names))
                self.valid[a, b, k] = True
                if hop.bandwidth_bps is not None:
                    self.inv_bps[a, b, k], bps[a, b, k] = 1.0 / hop.bandwidth_bps, hop.bandwidth_bps
                self.delay[a, b, k], self.jitter[a, b, k], keep[a, b, k] = hop.delay_s, hop.jitter_s, 1.0 - hop.loss
        one_way = self.delay.sum(-1)
        self.rtt = one_way + one_way.T  # as Network.rtt_s, Network.loss, Network.bottleneck_bps
        self.loss = 1.0 - keep.prod(-1)
        self.bottleneck = bps.min(-1)
        self.n_resources = len(names)

    def _star(self, net: Network) -> None:
        """The same arrays for a star, built as arrays: a->b crosses up{a} (resource a, hop 0) then
        down{b} (resource n + b, hop 1), both with the half profile (network._kind_path)."""
        n, hop = net.n, net.path(0, 1)[0] if net.n > 1 else None
        self.h = 2 if n > 1 else 0
        shape = (n, n, 2)
        off = ~np.eye(n, dtype=bool)
        self.valid = np.zeros(shape, dtype=bool)
        self.valid[..., 0] = self.valid[..., 1] = off
        self.res = np.zeros(shape, dtype=np.int64)
        self.res[..., 0] = np.arange(n)[:, None]
        self.res[..., 1] = n + np.arange(n)[None, :]
        self.res[~self.valid] = 0
        self.inv_bps, self.delay, self.jitter = np.zeros(shape), np.zeros(shape), np.zeros(shape)
        bps, keep = np.full(shape, np.inf), np.ones(shape)
        if hop is not None:
            v = self.valid
            if hop.bandwidth_bps is not None:
                self.inv_bps[v], bps[v] = 1.0 / hop.bandwidth_bps, hop.bandwidth_bps
            self.delay[v], self.jitter[v], keep[v] = hop.delay_s, hop.jitter_s, 1.0 - hop.loss
        one_way = self.delay.sum(-1)
        self.rtt = one_way + one_way.T
        self.loss = 1.0 - keep.prod(-1)
        self.bottleneck = bps.min(-1)
        self.n_resources = 2 * n if n > 1 else 0


_PATHS: "weakref.WeakKeyDictionary[Network, _Paths]" = weakref.WeakKeyDictionary()


def _paths(net: Network) -> _Paths:
    """The arrays of a network, cached with it (a sweep replays every method over the same network)."""
    if net not in _PATHS:
        _PATHS[net] = _Paths(net)
    return _PATHS[net]


def _fifo(res: np.ndarray, a: np.ndarray, x: np.ndarray, u: np.ndarray, seq: np.ndarray, free: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:
    """Serve messages on their links first come first served; returns (start, end) per message."""
    order = np.lexsort((seq, a, res))
    r, a_, x_, u_ = res[order], a[order], x[order], u[order]
    m = len(r)
    new = np.empty(m, dtype=bool)
    new[0], new[1:] = True, r[1:] != r[:-1]
    starts = np.flatnonzero(new)
    seg = np.cumsum(new) - 1
    csum = np.cumsum(x_)
    s_incl = csum - (csum - x_)[starts][seg]  # transmission times summed within each link, inclusive
    term = np.maximum(a_ + x_, u_) - s_incl
    pos = np.arange(m) - starts[seg]
    grid = np.full((len(starts), int(pos.max()) + 1), -np.inf)
    grid[seg, pos] = term
    np.maximum.accumulate(grid, axis=1, out=grid)
    f = s_incl + np.maximum(free[r], grid[seg, pos])
    prev = np.empty(m)
    prev[1:] = f[:-1]
    prev[starts] = free[r[starts]]
    ends = np.r_[starts[1:], m] - 1
    free[r[ends]] = f[ends]
    start, end = np.empty(m), np.empty(m)
    start[order], end[order] = np.maximum(a_, prev), f
    return start, end


@functools.lru_cache(maxsize=8)
def _patterns(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The all-gather's (src, dst) pairs in the Communicator's order, and per ring step the chunk each
    rank sends right (its plan's sends, in order). Read-only: shared by every replay of n ranks."""
    src = np.repeat(np.arange(n), n - 1)
    dst = np.array([p for r in range(n) for p in peers(r, n)], dtype=np.int64)
    ring = np.array([[m.part for m in all_reduce_plan(r, n) if m.op == "send"] for r in range(n)]).T
    for a in (src, dst, ring):
        a.flags.writeable = False
    return src, dst, ring


class LockstepReplay:
    """One replay (one link profile, one seed) of a Lockstep schedule."""

    def __init__(self, net: Network, wire: WireModel, tcp: TcpModel, speed: np.ndarray, seed: int):
        self.p = _paths(net)
        self.wire, self.tcp, self.speed = wire, tcp, speed
        self.rng = np.random.default_rng(seed)
        n = net.n
        self.free = np.zeros(self.p.n_resources)
        self.cwnd = np.full((n, n), float(tcp.initial_window_segments))
        self.sent_until = np.zeros((n, n))
        self.bytes_on_wire = 0.0
        self.messages = 0
        self.tcp_costs = tcp.mode != "steady" or bool(np.any(self.p.loss > 0))
        self.sampled_jitter = tcp.loss_mode == "sampled" and bool(np.any(self.p.jitter > 0))
        self.full = [bool(self.p.valid[..., k][~np.eye(n, dtype=bool)].all()) for k in range(self.p.h)]

    def windows_matter(self) -> bool:
        """Whether the connections' state can change this replay: slow start binds on some path (its
        BDP exceeds the initial window) or a path loses packets (the gaps between messages count).
        If not, a warm replay equals a cold one and its first pass can be skipped."""
        p, n = self.p, len(self.cwnd)
        off = ~np.eye(n, dtype=bool)
        with np.errstate(invalid="ignore"):  # unshaped without delay: no pipe to fill
            bdp = p.bottleneck * p.rtt / (8 * (self.wire.mss_bytes + self.wire.segment_header_bytes))
        bdp = np.nan_to_num(bdp, nan=0.0, posinf=np.inf)
        return bool(np.any(p.loss[off] > 0) or np.any(bdp[off] > self.tcp.initial_window_segments))

    def carry_over(self, elapsed_s: float, seed: int) -> None:
        """After a run that took ``elapsed_s``: the next inference starts with the links free, the
        connections' windows as they are and their last sends that long ago; fresh draws from ``seed``."""
        self.free[:] = 0.0
        self.sent_until -= elapsed_s
        self.bytes_on_wire, self.messages = 0.0, 0
        self.rng = np.random.default_rng(seed)

    def transfer(self, src: np.ndarray, dst: np.ndarray, payload: np.ndarray, t: np.ndarray,
                 unique: bool = False) -> np.ndarray:
        """Arrival times of messages src->dst issued at t (one batch, distinct pairs, program order).

        ``unique``: no two messages of the batch share a link (e.g. one ring step on a star),
        so each link serves at most one of them and no ordering is needed.
        """
        p, wire, tcp = self.p, self.wire, self.tcp
        segs, nbytes, acks = wire.segments(payload), wire.wire_bytes(payload).astype(float), wire.ack_bytes(payload)
        loss, bw = p.loss[src, dst], p.bottleneck[src, dst]
        if self.tcp_costs and np.any(loss > 0):  # retransmitted segments occupy the links too
            nbytes = wire_bytes_with_loss(tcp, segs, nbytes, loss, self.rng.binomial)
        stall = 0.0
        if self.tcp_costs:
            stall, cwnd = tcp_stall_s(tcp, wire, segs, nbytes, p.rtt[src, dst], bw, loss, self.cwnd[src, dst],
                                      t - self.sent_until[src, dst], self.rng.binomial)
            if tcp.mode == "slow_start":
                self.cwnd[src, dst] = cwnd
        if wire.stack_bytes_per_s is not None:
            stall = stall + wire.stack_extra_s(payload, nbytes, bw)
        self.bytes_on_wire += float(nbytes.sum() + acks.sum())
        self.messages += len(src)
        a = t + self.wire.per_message_s
        u = a.copy()
        for k in range(p.h):
            on = slice(None) if self.full[k] else np.flatnonzero(p.valid[src, dst, k])
            s_, d_ = src[on], dst[on]
            res = p.res[s_, d_, k]
            x = (nbytes[on] + acks[on]) * 8 * p.inv_bps[s_, d_, k]
            if unique:  # each link carries one message of the batch: the FIFO step directly
                start = np.maximum(a[on], self.free[res])
                end = np.maximum(start + x, u[on])
                self.free[res] = end
            else:
                start, end = _fifo(res, a[on], x, u[on], np.arange(len(res)), self.free)
            if k == 0:
                self.sent_until[s_, d_] = end
            d = p.delay[s_, d_, k]
            if self.sampled_jitter:
                d = d + self.rng.uniform(-1.0, 1.0, len(res)) * p.jitter[s_, d_, k]
            a[on], u[on] = start + d, end + d
        return u + stall

    def ring_is_unique(self, n: int) -> bool:
        """Whether the ring's messages (r -> r+1 for every r) use distinct links at every hop."""
        ranks = np.arange(n)
        res = self.p.res[ranks, (ranks + 1) % n]
        valid = self.p.valid[ranks, (ranks + 1) % n]
        return all(len(set(res[valid[:, k], k].tolist())) == int(valid[:, k].sum()) for k in range(res.shape[1]))

    def run(self, ls: Lockstep) -> dict[str, np.ndarray]:
        """Replay the whole schedule; per-rank arrays finish_s, compute_s, serialize_s, wait_s, bytes_sent."""
        n = ls.n
        if any(kind == "ring" for kind, _ in ls.colls) and not self.ring_is_unique(n):
            raise NotLockstepNetwork("ring steps share a link (their order across steps matters)")
        ranks = np.arange(n)
        clock, compute, ser, wait = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
        sent = np.zeros(n, dtype=np.int64)
        right = (ranks + 1) % n
        src_ag, dst_ag, ring_sends = _patterns(n)
        for k, (kind, sizes) in enumerate(ls.colls):
            c, z = ls.compute[k] * self.speed, ls.serialize[k] * self.speed
            clock, compute, ser = clock + c + z, compute + c, ser + z
            if kind in ("all_gather", "direct"):
                # direct all-reduce: a round of chunk p to its owner p, then an all-gather of the sums
                rounds = [sizes[dst_ag], sizes[src_ag]] if kind == "direct" else [sizes[src_ag]]
                for payload in rounds:
                    arr = self.transfer(src_ag, dst_ag, payload, clock[src_ag])
                    done = clock.copy()
                    np.maximum.at(done, dst_ag, arr)
                    wait += done - clock
                    clock = done
                    np.add.at(sent, src_ag, payload)
            elif kind == "ring":
                for chunk in ring_sends:  # each rank sends one chunk right, then waits for one from the left
                    arr = self.transfer(ranks, right, sizes[chunk], clock, unique=True)
                    got = np.empty(n)
                    got[right] = arr
                    done = np.maximum(clock, got)
                    wait += done - clock
                    clock = done
                    sent += sizes[chunk]
        c = ls.compute[-1] * self.speed
        return {"finish_s": clock + c, "compute_s": compute + c, "serialize_s": ser, "wait_s": wait,
                "bytes_sent": sent}
