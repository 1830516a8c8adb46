"""The Communicator: the only way a method talks to other ranks.

Collectives are written once here, on top of two transport primitives
(``_post``: hand a message to the transport without waiting for the receiver,
``_take``: block until the next message from a peer arrives). The in-process
and gRPC transports implement only those two, so both run the same algorithms,
reduce in the same order (bit-identical outputs) and record the same schedule.

Algorithms (N ranks, payload of S bytes):
- all_gather: direct, each rank sends its tensor to every peer: (N-1)*S sent.
- all_reduce, ``ring`` (Megatron/NCCL): ring reduce-scatter + ring all-gather: 2*(N-1)/N*S sent
  in 2*(N-1) sequential rounds.
- all_reduce, ``direct``: reduce-scatter then all-gather straight to each peer: chunk p to rank p,
  the sum of its own chunk to every peer: the same 2*(N-1)/N*S sent, in 2 rounds.
- broadcast: the source sends to every peer: (N-1)*S sent by the source.
- send / recv: point to point.

Each algorithm's message pattern is one pure function (``all_gather_plan``,
``all_reduce_plan``, ``direct_all_reduce_plan``, ``broadcast_plan``, ``send_plan``, ``recv_plan``): the
Communicator executes it, and ``plan_ops`` turns it into the ops a trace records
without running anything (the methods' stated schedules, the simulator).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import NamedTuple, Sequence

import torch

from testbed.comm.serde import Encoded, bytes_to_tensor, encode_tensor
from testbed.comm.trace import Collective, Trace
from testbed.errors import CommError


class Msg(NamedTuple):
    """One message of a collective, as the calling rank sees it."""

    op: str  # "send" | "recv"
    peer: int
    step: int  # message step within the call (part of its tag)
    part: int  # what it carries: all_gather: the origin rank; all_reduce: the chunk; else 0


def peers(rank: int, world_size: int) -> list[int]:
    """Other ranks, starting after ``rank`` (spreads load in direct all-to-all)."""
    return [(rank + i) % world_size for i in range(1, world_size)]


def all_gather_plan(rank: int, world_size: int) -> list[Msg]:
    """Direct all-gather: own tensor to every peer, then one tensor from each peer (same order)."""
    ps = peers(rank, world_size)
    return [Msg("send", p, 0, rank) for p in ps] + [Msg("recv", p, 0, p) for p in ps]


def all_reduce_plan(rank: int, world_size: int) -> list[Msg]:
    """Ring all-reduce over N chunks (none for one rank). Reduce-scatter step s (s < N-1) sends
    chunk rank-s right and adds chunk rank-s-1 from the left into its own; after it rank r owns the
    sum of chunk r+1. All-gather step N+s then passes reduced chunks on (rank+1-s out, rank-s in)."""
    n = world_size
    right, left = (rank + 1) % n, (rank - 1) % n
    out: list[Msg] = []
    for s in range(n - 1):
        out += [Msg("send", right, s, (rank - s) % n), Msg("recv", left, s, (rank - s - 1) % n)]
    for s in range(n - 1):
        out += [Msg("send", right, n + s, (rank + 1 - s) % n), Msg("recv", left, n + s, (rank - s) % n)]
    return out


def is_reduce_step(step: int, world_size: int) -> bool:
    """Whether a message of all_reduce_plan is added into the chunk (reduce-scatter) or replaces it."""
    return step < world_size - 1


# direct all-reduce steps sit above the ring's (< 2N) so that ranks running different algorithms
# fail with "out of step" at their first message instead of mixing chunks
DIRECT_STEP = 1 << 15


def direct_all_reduce_plan(rank: int, world_size: int) -> list[Msg]:
    """Direct all-reduce over N chunks (none for one rank). Reduce-scatter (step DIRECT_STEP): chunk p
    to every peer p, then chunk ``rank`` from every peer; all-gather (step DIRECT_STEP+1): the summed
    chunk ``rank`` to every peer, then chunk p from every peer p. Sends of a round go out together."""
    ps = peers(rank, world_size)
    rs, ag = DIRECT_STEP, DIRECT_STEP + 1
    return ([Msg("send", p, rs, p) for p in ps] + [Msg("recv", p, rs, rank) for p in ps]
            + [Msg("send", p, ag, rank) for p in ps] + [Msg("recv", p, ag, p) for p in ps])


ALL_REDUCE = ("ring", "direct")
ALL_REDUCE_PLANS = {"ring": all_reduce_plan, "direct": direct_all_reduce_plan}
# a chunk below this many bytes is latency-bound on any edge link (64 KiB: 0.5 ms at 1 Gbit/s,
# about one round trip), so the 2 rounds of direct beat the 2(N-1) of ring wherever paths meet
DIRECT_CHUNK_BYTES = 64 * 1024
# a shaped path with less one-way delay than this has no delay line to speak of: its round trip is
# set by its queues, and N-1 flows converging on one access link outgrow them (see choose_all_reduce)
QUEUE_BOUND_DELAY_MS = 0.5


def choose_all_reduce(nbytes: int, world_size: int, flat: bool = True, delay_ms: float | None = None) -> str:
    """The default all-reduce algorithm for a payload of ``nbytes`` over ``world_size`` ranks.

    ``flat``: every pair of ranks is one link or one switch apart (star, mesh, loopback). There
    both algorithms put the same bytes on every access link, so direct (2 rounds) wins wherever
    round trips cost something. Where paths share links (a line, trees), direct's N-1 concurrent
    messages per rank queue on the shared hops, so ring is kept once a chunk is no longer
    latency-bound. ``delay_ms``: the one-way delay of the shaped links (None: not shaped, e.g.
    loopback). Below ``QUEUE_BOUND_DELAY_MS`` the ACK clock runs at queueing speed and direct's
    N-1 flows into every access link overflow its queue: in a 4-host star at 100 Mbit/s, vit-base
    tensor parallel at 197 tokens (151 KiB chunks) measured 3.19 s with direct (341 segments
    retransmitted per inference) against 2.15 s with the ring (3), and at 1 ms 2.13 s direct
    against 2.33 s ring; so without a delay the ring (one flow per link) is kept for bulk chunks too.
    """
    if world_size <= 2 or nbytes / world_size < DIRECT_CHUNK_BYTES:
        return "direct"  # for N=2 both plans are the same two messages; direct skips the ring's order
    if flat and (delay_ms is None or delay_ms >= QUEUE_BOUND_DELAY_MS):
        return "direct"
    return "ring"


def check_all_reduce(algorithm: str) -> None:
    if algorithm not in ALL_REDUCE:
        raise CommError(f"unknown all-reduce algorithm {algorithm!r}; allowed: {', '.join(ALL_REDUCE)}")


def broadcast_plan(rank: int, world_size: int, src: int) -> list[Msg]:
    """The source sends to every peer; every other rank receives once from the source."""
    if rank == src:
        return [Msg("send", p, 0, 0) for p in peers(src, world_size)]
    return [Msg("recv", src, 0, 0)]


def send_plan(dst: int) -> list[Msg]:
    return [Msg("send", dst, 0, 0)]


def recv_plan(src: int) -> list[Msg]:
    return [Msg("recv", src, 0, 0)]


def split_sizes(numel: int, world_size: int) -> list[int]:
    """Element counts of torch.tensor_split(x, world_size) for x of ``numel`` elements (all_reduce's chunks)."""
    base, extra = divmod(numel, world_size)
    return [base + (1 if i < extra else 0) for i in range(world_size)]


def plan_ops(plan: Sequence[Msg], part_bytes: Sequence[int]) -> list[tuple[str, int, int]]:
    """The trace ops (op, peer, payload bytes) of a plan whose part i has ``part_bytes[i]`` bytes."""
    return [(m.op, m.peer, part_bytes[m.part]) for m in plan]


class Communicator(ABC):
    def __init__(self, rank: int, world_size: int, timeout_s: float = 120.0):
        if not 0 <= rank < world_size:
            raise CommError(f"rank {rank} outside world of size {world_size}")
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.trace = Trace(rank)
        self._seq = 0  # collective call counter: every rank makes the same calls in the same order

    # -- transport primitives ---------------------------------------------
    @abstractmethod
    def _post(self, dst: int, tag: int, data: Encoded) -> None:
        """Queue the message ``data`` for rank ``dst``. Must not wait for ``dst`` to receive it, and
        must have copied ``data`` when it returns (the caller may then change the tensor). The same
        ``data`` may be posted to several peers in a row (all_gather, broadcast)."""

    @abstractmethod
    def _take(self, src: int, tag: int) -> bytes:
        """Return the next message from rank ``src``; it must carry ``tag``.

        Raises CommError naming the peer if nothing arrives within ``timeout_s``,
        the peer is gone, or the tag is out of step.
        """

    def close(self) -> None:
        """Release transport resources."""

    def peer_name(self, rank: int) -> str:
        """How errors name a peer (transports add its address)."""
        return f"rank {rank}"

    # -- public collectives -------------------------------------------------
    @property
    def peers(self) -> list[int]:
        """Other ranks, starting after this one."""
        return peers(self.rank, self.world_size)

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's tensor, in rank order. Shapes may differ between ranks."""
        with _Call(self, "all_gather") as c:
            data = c.encode(t)
            out: list[torch.Tensor | None] = [None] * self.world_size
            out[self.rank] = t
            for m in all_gather_plan(self.rank, self.world_size):
                if m.op == "send":
                    c.post(m.peer, m.step, data, t.nbytes)
                else:
                    out[m.part] = c.decode(c.take(m.peer, m.step))
            return out  # type: ignore[return-value]

    def all_reduce(self, t: torch.Tensor, algorithm: str = "ring") -> torch.Tensor:
        """Element-wise sum over ranks: ``ring`` or ``direct`` (see the module docstring)."""
        check_all_reduce(algorithm)
        n = self.world_size
        if n == 1:
            return t
        if algorithm == "direct":
            return self._direct_all_reduce(t)
        with _Call(self, "all_reduce") as c:
            shape = t.shape
            chunks = [x.clone() for x in torch.tensor_split(t.reshape(-1), n)]
            for m in all_reduce_plan(self.rank, n):
                if m.op == "send":
                    c.post(m.peer, m.step, c.encode(chunks[m.part]), chunks[m.part].nbytes)
                elif is_reduce_step(m.step, n):
                    chunks[m.part] += c.decode(c.take(m.peer, m.step))
                else:
                    chunks[m.part] = c.decode(c.take(m.peer, m.step))
            return torch.cat(chunks).reshape(shape)

    def _direct_all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Direct all-reduce: the owner of chunk r sums the N contributions in rank order, so every
        rank ends with bit-identical sums whatever order the messages arrive in."""
        n, rank = self.world_size, self.rank
        with _Call(self, "all_reduce") as c:
            shape = t.shape
            chunks = list(torch.tensor_split(t.reshape(-1), n))
            contrib: list[torch.Tensor | None] = [None] * n
            contrib[rank] = chunks[rank]
            out: list[torch.Tensor | None] = [None] * n
            for m in direct_all_reduce_plan(rank, n):
                if m.step == DIRECT_STEP:
                    if m.op == "send":
                        c.post(m.peer, m.step, c.encode(chunks[m.part]), chunks[m.part].nbytes)
                    else:
                        contrib[m.peer] = c.decode(c.take(m.peer, m.step))
                elif m.op == "send":
                    if out[rank] is None:  # every contribution is in: reduce once, in rank order
                        acc = contrib[0].clone()
                        for x in contrib[1:]:
                            acc += x
                        out[rank], data = acc, c.encode(acc)
                    c.post(m.peer, m.step, data, out[rank].nbytes)
                else:
                    out[m.part] = c.decode(c.take(m.peer, m.step))
            return torch.cat(out).reshape(shape)  # type: ignore[arg-type]

    def broadcast(self, t: torch.Tensor | None, src: int) -> torch.Tensor:
        """The tensor of rank ``src`` on every rank (others pass None)."""
        with _Call(self, "broadcast") as c:
            if self.rank == src:
                assert t is not None, "broadcast source must pass a tensor"
                data = c.encode(t)
            for m in broadcast_plan(self.rank, self.world_size, src):
                if m.op == "send":
                    c.post(m.peer, m.step, data, t.nbytes)
                else:
                    t = c.decode(c.take(m.peer, m.step))
            return t

    def send(self, t: torch.Tensor, dst: int) -> None:
        with _Call(self, "send") as c:
            (m,) = send_plan(dst)
            c.post(m.peer, m.step, c.encode(t), t.nbytes)

    def recv(self, src: int) -> torch.Tensor:
        with _Call(self, "recv") as c:
            (m,) = recv_plan(src)
            return c.decode(c.take(m.peer, m.step))


_KINDS = ("all_gather", "all_reduce", "broadcast", "send", "recv")


class _Call:
    """One collective call: tags its messages, times it, and records it in the trace.

    A tag is (call number << 20 | kind << 16 | step); point-to-point send/recv share a kind code
    so that a send matches the peer's recv.
    """

    def __init__(self, comm: Communicator, kind: str):
        self.comm, self.ev = comm, Collective(kind)

    def __enter__(self) -> "_Call":
        self.seq = self.comm._seq
        self.comm._seq += 1
        self.t0 = self.comm.trace.close_compute()
        return self

    def __exit__(self, *exc) -> None:
        self.ev.duration_s = time.perf_counter() - self.t0
        self.comm.trace.add(self.ev)

    def _tag(self, step: int) -> int:
        kind = _KINDS.index(self.ev.kind) if self.ev.kind not in ("send", "recv") else 3
        return (self.seq << 20) | (kind << 16) | step

    def encode(self, t: torch.Tensor) -> Encoded:
        t0 = time.perf_counter()
        data = encode_tensor(t)
        self.ev.serialize_s += time.perf_counter() - t0
        return data

    def decode(self, data: bytes) -> torch.Tensor:
        t0 = time.perf_counter()
        t = bytes_to_tensor(data)
        self.ev.serialize_s += time.perf_counter() - t0
        return t

    def post(self, dst: int, step: int, data: Encoded, payload_bytes: int) -> None:
        self.comm._post(dst, self._tag(step), data)
        self.ev.ops.append(("send", dst, payload_bytes))

    def take(self, src: int, step: int) -> bytes:
        t0 = time.perf_counter()
        data = self.comm._take(src, self._tag(step))
        self.ev.wait_s += time.perf_counter() - t0
        # payload = message minus the serde header; the header is transport framing
        ndim = data[1] if len(data) > 1 else 0
        self.ev.ops.append(("recv", src, len(data) - 2 - 8 * ndim))
        return data


def check_tag(comm: Communicator, src: int, expected: int, got: int) -> None:
    """Transports call this: a mismatched tag means the ranks ran different programs."""
    if expected != got:
        raise CommError(
            f"rank {comm.rank}: message from {comm.peer_name(src)} out of step "
            f"(expected {_describe(expected)}, got {_describe(got)}): the ranks are not running the same program"
        )


def _describe(tag: int) -> str:
    kind = (tag >> 16) & 0xF
    return f"call {tag >> 20} {_KINDS[kind] if kind < len(_KINDS) else kind} step {tag & 0xFFFF}"
