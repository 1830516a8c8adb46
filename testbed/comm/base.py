"""The Communicator: the only way a method talks to other ranks.

Collectives are written once here, on top of two transport primitives
(``_post``: hand a message to the transport without waiting for the receiver,
``_take``: block until the next message from a peer arrives). The in-process
and gRPC transports implement only those two, so both run the same algorithms,
reduce in the same order (bit-identical outputs) and record the same schedule.

Algorithms (N ranks, payload of S bytes):
- all_gather: direct, each rank sends its tensor to every peer: (N-1)*S sent.
- all_reduce: ring reduce-scatter + ring all-gather: 2*(N-1)/N*S sent.
- broadcast: the source sends to every peer: (N-1)*S sent by the source.
- send / recv: point to point.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

import torch

from testbed.comm.serde import bytes_to_tensor, tensor_to_bytes
from testbed.comm.trace import Collective, Trace
from testbed.errors import CommError


class Communicator(ABC):
    def __init__(self, rank: int, world_size: int, timeout_s: float = 120.0):
        if not 0 <= rank < world_size:
            raise CommError(f"rank {rank} outside world of size {world_size}")
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.trace = Trace(rank)
        self._seq = 0  # collective call counter: every rank makes the same calls in the same order

    # -- transport primitives ---------------------------------------------
    @abstractmethod
    def _post(self, dst: int, tag: int, data: bytes) -> None:
        """Queue ``data`` for rank ``dst``. Must not wait for ``dst`` to receive it."""

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
        """Other ranks, starting after this one (spreads load in direct all-to-all)."""
        n = self.world_size
        return [(self.rank + i) % n for i in range(1, n)]

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's tensor, in rank order. Shapes may differ between ranks."""
        with _Call(self, "all_gather") as c:
            data = c.encode(t)
            for p in self.peers:
                c.post(p, 0, data, t.nbytes)
            out: list[torch.Tensor | None] = [None] * self.world_size
            out[self.rank] = t
            for p in self.peers:
                out[p] = c.decode(c.take(p, 0))
            return out  # type: ignore[return-value]

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (ring: reduce-scatter then all-gather)."""
        n = self.world_size
        if n == 1:
            return t
        with _Call(self, "all_reduce") as c:
            shape = t.shape
            chunks = [x.clone() for x in torch.tensor_split(t.reshape(-1), n)]
            right, left = (self.rank + 1) % n, (self.rank - 1) % n
            for s in range(n - 1):  # reduce-scatter: after it, rank r owns the sum of chunk r+1
                send_i, recv_i = (self.rank - s) % n, (self.rank - s - 1) % n
                c.post(right, s, c.encode(chunks[send_i]), chunks[send_i].nbytes)
                chunks[recv_i] += c.decode(c.take(left, s))
            for s in range(n - 1):  # all-gather of the reduced chunks
                send_i, recv_i = (self.rank + 1 - s) % n, (self.rank - s) % n
                c.post(right, n + s, c.encode(chunks[send_i]), chunks[send_i].nbytes)
                chunks[recv_i] = c.decode(c.take(left, n + s))
            return torch.cat(chunks).reshape(shape)

    def broadcast(self, t: torch.Tensor | None, src: int) -> torch.Tensor:
        """The tensor of rank ``src`` on every rank (others pass None)."""
        with _Call(self, "broadcast") as c:
            if self.rank == src:
                assert t is not None, "broadcast source must pass a tensor"
                data = c.encode(t)
                for p in self.peers:
                    c.post(p, 0, data, t.nbytes)
                return t
            return c.decode(c.take(src, 0))

    def send(self, t: torch.Tensor, dst: int) -> None:
        with _Call(self, "send") as c:
            c.post(dst, 0, c.encode(t), t.nbytes)

    def recv(self, src: int) -> torch.Tensor:
        with _Call(self, "recv") as c:
            return c.decode(c.take(src, 0))


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

    def encode(self, t: torch.Tensor) -> bytes:
        t0 = time.perf_counter()
        data = tensor_to_bytes(t)
        self.ev.serialize_s += time.perf_counter() - t0
        return data

    def decode(self, data: bytes) -> torch.Tensor:
        t0 = time.perf_counter()
        t = bytes_to_tensor(data)
        self.ev.serialize_s += time.perf_counter() - t0
        return t

    def post(self, dst: int, step: int, data: bytes, payload_bytes: int) -> None:
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
