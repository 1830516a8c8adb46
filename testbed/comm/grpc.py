"""gRPC transport: the Communicator's two primitives over persistent peer streams.

Every pair of ranks shares one bidirectional ``Peer.Exchange`` stream for the
whole job; the lower rank dials, the higher rank's server accepts (routed by job
id and rank through a :class:`PeerHub`). Each end of a stream is a :class:`_Link`:

- sending: ``_post`` cuts the message into frames (the one copy of its bytes, straight from
  the tensor) and queues each as soon as it is made, so the first is on its way while the
  rest are copied; the stream's sender thread (gRPC's request consumer on the
  dialling side, a server worker on the accepting side) hands them to gRPC, so the caller
  never waits for the receiver. A message posted to several peers is framed once;
- receiving: a reader thread reassembles chunks into messages in a per-peer inbox;
  ``_take`` waits on that inbox with the deadline ``timeout_s``. Messages of RECV_POOL_MIN_BYTES
  or more land in buffers the link reuses once nothing refers to them any more
  (:class:`RecvPool`): writing into fresh memory costs its page faults, several times the copy.

Failures are surfaced at once rather than at the deadline: when any stream of a
communicator breaks (peer killed, connection reset, keepalive timeout) every
waiting and later ``_take`` raises a CommError naming the peer, its address and
what happened. Peers are probed at construction with ``connect_timeout_s``, so a
wrong or unreachable address fails the job load, not its first collective.

With ``credentials`` (testbed.comm.tls, a node started with --tls-dir) the streams run over
mutual TLS: this rank presents its certificate and checks the peer's against the
experiment's CA; a hub serving TLS takes streams only from the node certificate. Without
them the channels are plain, exactly as before (nothing added per message either way).
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from typing import Iterator, Sequence

import grpc

from testbed.comm.base import Communicator, check_tag
from testbed.errors import CommError, check
from testbed.comm import frames, tls
from testbed.comm.channels import CHUNK_BYTES, KEEPALIVE_TIMEOUT_S, data_channel_options, make_server

_STOP = object()  # outbound sentinel: end the stream
_BROKEN = object()  # inbound sentinel: the job is broken (any stream broke); see .failure
_CLOSED = object()  # inbound sentinel: this peer ended its stream cleanly (its job is over)

# Messages from this size up are received into reused buffers (RecvPool); smaller ones come from
# the allocator's heap anyway. Fresh memory costs its page faults: 64 MiB written into a new
# buffer took 45-54 ms on a 2-core VM, into one already touched 7.8 ms.
RECV_POOL_MIN_BYTES = 64 << 10
RECV_POOL_BUFFERS = 4  # per link: a collective's messages from one peer in flight at once, and spare
RECV_POOL_MAX_BYTES = 256 << 20  # per link: what a pool may keep (an all-gather of 64 MiB per rank fits)


class RecvPool:
    """Receive buffers of one link, reused once free. A buffer is handed out as the message
    (bytearray); the tensor decoded from it views it (testbed.comm.serde), so it stays in use for
    as long as that tensor, any view of it, or the inbox refers to it. Free means the pool's
    reference is the only one left (CPython's reference count), so reuse never overwrites data
    anyone can still read. At most ``size`` buffers of ``max_bytes`` together are kept; beyond
    that messages get new ones. A node keeps what its pools hold between inferences (its resident
    memory shows it): the largest messages of a job, a few per peer."""

    def __init__(self, size: int = RECV_POOL_BUFFERS, max_bytes: int = RECV_POOL_MAX_BYTES):
        self.size, self.max_bytes = size, max_bytes
        self.buffers: list[bytearray] = []

    def get(self, nbytes: int) -> bytearray:
        """A buffer of exactly ``nbytes`` bytes (contents undefined) that nobody else refers to."""
        spare = None
        for i in range(len(self.buffers)):
            if sys.getrefcount(self.buffers[i]) == 2:  # free: only the list and getrefcount's argument
                if len(self.buffers[i]) == nbytes:
                    return self.buffers[i]
                spare = i if spare is None else spare
        buf = bytearray(nbytes)
        kept = sum(len(b) for b in self.buffers)
        if len(self.buffers) < self.size and kept + nbytes <= self.max_bytes:
            self.buffers.append(buf)
        elif spare is not None and kept - len(self.buffers[spare]) + nbytes <= self.max_bytes:
            self.buffers[spare] = buf  # replaces a free buffer of another size (message sizes changed)
        return buf


class _Link:
    """This rank's end of the stream shared with one peer."""

    def __init__(self, comm: "GrpcCommunicator", peer: int):
        self.comm, self.peer = comm, peer
        self.outq: queue.SimpleQueue = queue.SimpleQueue()  # frames (bytes) | _STOP
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()  # (tag, bytes) | _BROKEN
        self.ready = threading.Event()  # the peer's Hello arrived
        self.done = threading.Event()  # the reader saw the stream end
        self.call: grpc.Future | None = None  # dialling side: the RPC, to cancel on abort
        self.context: grpc.ServicerContext | None = None  # accepting side: the RPC, to cancel on abort
        self.bye = False  # the peer said it is done (a clean end, not a death)
        self._buf: bytearray | None = None  # message being reassembled
        self._off = 0  # bytes of it received so far
        self._next = 0  # index of the next chunk expected
        self.pool = RecvPool()

    def outgoing(self) -> Iterator:
        """Frames for the stream: our Hello, every queued message, and Bye at _STOP."""
        c = self.comm
        yield frames.encode_hello(c.job_id, c.rank, self.peer)
        while True:
            item = self.outq.get()
            if item is _STOP:
                yield frames.encode_bye()
                return
            yield item

    def read(self, incoming: Iterator) -> None:
        """Reader thread: deliver the peer's frames until its stream ends or breaks."""
        try:
            for frame in incoming:
                self._deliver(frames.decode_frame(frame))
            if not self.bye:  # a dying process's connection can end like a clean stream
                self.comm._link_broke(self, "stream ended without a goodbye (node died or connection lost)")
        except grpc.RpcError as e:  # reset, cancelled by an aborting peer, keepalive timeout
            self.comm._link_broke(self, f"stream broke: {_rpc_text(e)}")
        except Exception as e:  # noqa: BLE001 - a malformed frame breaks the job like a reset
            self.comm._link_broke(self, f"bad frame: {e}")
        finally:
            self.done.set()

    def _deliver(self, msg: frames.Hello | frames.Chunk | frames.Bye) -> None:
        if isinstance(msg, frames.Bye):  # the peer's job is over: keep what arrived, end our side
            self.bye = True
            self.inbox.put(_CLOSED)
            self.outq.put(_STOP)
            return
        if isinstance(msg, frames.Hello):
            if (msg.src, msg.dst, msg.job_id) != (self.peer, self.comm.rank, self.comm.job_id):
                raise ValueError(f"hello from rank {msg.src} to {msg.dst} for job {msg.job_id!r} "
                                 f"on the link to rank {self.peer}")
            self.ready.set()
            return
        if msg.src != self.peer or msg.index != self._next:
            raise ValueError(f"chunk {msg.index}/{msg.count} from rank {msg.src}, expected chunk {self._next} "
                             f"from rank {self.peer}")
        if msg.count == 1:
            if len(msg.payload) >= RECV_POOL_MIN_BYTES:  # copied here, not by the decoder into new memory
                buf = self.pool.get(len(msg.payload))
                buf[:] = msg.payload
                self.inbox.put((msg.tag, buf))
            else:
                self.inbox.put((msg.tag, msg.payload))
            return
        if msg.index == 0:
            self._buf = (self.pool.get(msg.total_bytes) if msg.total_bytes >= RECV_POOL_MIN_BYTES
                         else bytearray(msg.total_bytes))
            self._off = 0
        end = self._off + len(msg.payload)
        self._buf[self._off:end] = msg.payload  # type: ignore[index]
        self._off, self._next = end, self._next + 1
        if self._next == msg.count:
            if end != msg.total_bytes:
                raise ValueError(f"message of {msg.total_bytes} bytes from rank {self.peer} arrived with {end}")
            self.inbox.put((msg.tag, self._buf))
            self._buf, self._off, self._next = None, 0, 0


class GrpcCommunicator(Communicator):
    """One rank's Communicator over gRPC peer streams.

    ``addresses``: the data-plane host:port of every rank, in rank order (this rank's
    own entry is where its ``hub`` is served). ``timeout_s``: deadline of each wait
    for a peer's message; ``connect_timeout_s``: deadline for reaching every peer
    and opening every stream, at construction. ``chunk_bytes``: largest payload per
    frame (both ends of a job must use the same value). ``keepalive_timeout_s``: of the
    peer channels (testbed.comm.channels). ``credentials``: this rank's TLS identity for
    dialling its peers (``tls.channel_credentials(dir, "node")``); None: plain channels.
    """

    def __init__(self, rank: int, addresses: Sequence[str], hub: "PeerHub", job_id: str,
                 timeout_s: float = 120.0, connect_timeout_s: float = 10.0, chunk_bytes: int = CHUNK_BYTES,
                 keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
                 credentials: grpc.ChannelCredentials | None = None):
        super().__init__(rank, len(addresses), timeout_s)
        check(isinstance(chunk_bytes, int) and chunk_bytes >= 1, "chunk_bytes", chunk_bytes, "an integer >= 1")
        for name, v in (("timeout_s", timeout_s), ("connect_timeout_s", connect_timeout_s)):
            check(isinstance(v, (int, float)) and v > 0, name, v, "a number of seconds > 0")
        self.addresses, self.hub, self.job_id = list(addresses), hub, job_id
        self.connect_timeout_s, self.chunk_bytes = connect_timeout_s, chunk_bytes
        self.keepalive_timeout_s, self.credentials = keepalive_timeout_s, credentials
        self.links = {p: _Link(self, p) for p in range(self.world_size) if p != rank}
        self.failure: str | None = None
        self._framed: tuple = (None, None, None)  # the last message posted, its tag and frames
        self._channels: list[grpc.Channel] = []
        self._closed = False
        self._lock = threading.Lock()
        hub.register(job_id, rank, self)
        try:
            self._connect()
        except BaseException:
            self.close()
            raise

    def peer_name(self, rank: int) -> str:
        return f"rank {rank} at {self.addresses[rank]}"

    # -- set-up -------------------------------------------------------------------
    def _connect(self) -> None:
        """Probe every peer, dial the higher ranks, wait for every stream's Hello."""
        deadline = time.monotonic() + self.connect_timeout_s
        options = data_channel_options(self.chunk_bytes, self.keepalive_timeout_s)
        probes = {p: tls.open_channel(self.addresses[p], options, self.credentials) for p in self.links}
        self._channels += probes.values()
        futures = {p: grpc.channel_ready_future(ch) for p, ch in probes.items()}
        unreachable = []
        for p, fut in futures.items():
            try:
                fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except grpc.FutureTimeoutError:
                unreachable.append(self.peer_name(p))
        if unreachable:
            why = ("no node there accepts this node's TLS certificate, or none answers" if self.credentials
                   else "no gRPC server answers there")
            raise CommError(f"rank {self.rank}: cannot reach {', '.join(unreachable)} "
                            f"within {self.connect_timeout_s:g} s ({why})")
        for p, link in self.links.items():
            if p > self.rank:  # the lower rank of a pair dials; the probe channel becomes the stream's
                link.call = probes[p].stream_stream(frames.EXCHANGE_METHOD)(link.outgoing())  # raw bytes frames
                link.call.add_done_callback(lambda _f, q=link.outq: q.put(_STOP))
                self._start_reader(link, link.call)
            else:
                probes[p].close()  # the peer dials us; the probe only proved it is reachable
        for p, link in self.links.items():
            while not link.ready.wait(0.05):  # short waits: a stream refused meanwhile ends this at once
                if self.failure:
                    raise CommError(f"rank {self.rank}: {self.failure}")
                if time.monotonic() > deadline:
                    raise CommError(f"rank {self.rank}: no stream with {self.peer_name(p)} within "
                                    f"{self.connect_timeout_s:g} s (is it loaded with job {self.job_id!r}?)")

    def _start_reader(self, link: _Link, incoming: Iterator) -> None:
        threading.Thread(target=link.read, args=(incoming,), daemon=True,
                         name=f"peer-read-{self.rank}<-{link.peer}").start()

    def accept(self, hello: frames.Hello, incoming: Iterator, context: grpc.ServicerContext) -> Iterator:
        """Hub callback: a lower rank dialled us and said Hello. Returns the frames to stream back."""
        link = self.links.get(hello.src)
        if link is None or hello.src > self.rank or link.ready.is_set() or self._closed:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"rank {self.rank} of job {self.job_id!r} takes no stream from rank {hello.src} now")
        link.context = context
        context.add_callback(lambda: link.outq.put(_STOP))  # the RPC ended: stop the sender
        link.ready.set()
        self._start_reader(link, incoming)
        return link.outgoing()

    # -- transport primitives ---------------------------------------------------
    def _post(self, dst: int, tag: int, data) -> None:
        if self.failure or self._closed:
            why = self.failure or "this communicator is closed"
            raise CommError(f"rank {self.rank}: cannot send to {self.peer_name(dst)}: {why}")
        outq = self.links[dst].outq
        last_data, last_tag, framed = self._framed
        if data is last_data and tag == last_tag:  # frames carry no destination: share them
            for frame in framed:
                outq.put(frame)
            return
        framed = []
        for frame in frames.encode_chunks(self.rank, tag, data, self.chunk_bytes):
            outq.put(frame)  # the sender thread sends it while the next one is copied
            framed.append(frame)
        self._framed = (data, tag, framed)

    def _take(self, src: int, tag: int) -> bytes:
        link = self.links[src]
        try:
            item = link.inbox.get(timeout=self.timeout_s)
        except queue.Empty:
            raise CommError(f"rank {self.rank}: nothing from {self.peer_name(src)} "
                            f"within {self.timeout_s:g} s") from None
        if item is _BROKEN or item is _CLOSED:
            link.inbox.put(item)  # every later take fails the same way
            why = self.failure if item is _BROKEN else f"{self.peer_name(src)} closed its stream (its job ended)"
            raise CommError(f"rank {self.rank}: while waiting for {self.peer_name(src)}: {why}")
        got, data = item
        check_tag(self, src, tag, got)
        return data

    # -- failure and shutdown -----------------------------------------------------
    def _link_broke(self, link: _Link, why: str) -> None:
        """A stream broke: the job cannot go on; wake every waiter at once."""
        with self._lock:
            if self._closed or self.failure:
                return
            self.failure = f"lost {self.peer_name(link.peer)}: {why}"
        self._fail_all()

    def abort(self, reason: str) -> None:
        """Break the job on purpose (a local error): cancel every stream, so peers fail at once too."""
        with self._lock:
            self.failure = self.failure or reason
        self._fail_all()
        self.close()

    def _cancel_streams(self) -> None:
        """End every stream with an error status (not a clean end), so each peer sees a broken job."""
        for link in self.links.values():
            if link.call is not None:
                link.call.cancel()
            if link.context is not None:
                link.context.cancel()

    def _fail_all(self) -> None:
        for link in self.links.values():
            link.inbox.put(_BROKEN)

    def close(self, flush_s: float = 2.0) -> None:
        """End every stream. Idempotent. A healthy job ends cleanly: queued messages go out first
        (for up to ``flush_s``) and peers can still finish. A broken job cancels its streams."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.hub.unregister(self.job_id, self.rank, self)
        if self.failure:
            self._cancel_streams()
        for link in self.links.values():
            link.outq.put(_STOP)
        deadline = time.monotonic() + (0.0 if self.failure else flush_s)
        for link in self.links.values():  # the peer ends its side when it sees ours end
            if link.ready.is_set():
                link.done.wait(max(0.0, deadline - time.monotonic()))
            if link.call is not None:
                link.call.cancel()
        for ch in self._channels:
            ch.close()


class PeerHub:
    """The Peer service of one server: routes each incoming stream to its job's communicator.

    Frames travel as raw bytes (no (de)serializer): testbed.comm.frames encodes them.
    """

    def __init__(self, accept_timeout_s: float = 30.0):
        # a peer may dial before this node has received its LoadJob; wait that long for it
        self.accept_timeout_s = accept_timeout_s
        self._comms: dict[tuple[str, int], GrpcCommunicator] = {}
        self._cond = threading.Condition()

    def register(self, job_id: str, rank: int, comm: GrpcCommunicator) -> None:
        with self._cond:
            self._comms[(job_id, rank)] = comm
            self._cond.notify_all()

    def unregister(self, job_id: str, rank: int, comm: GrpcCommunicator) -> None:
        with self._cond:
            if self._comms.get((job_id, rank)) is comm:
                del self._comms[(job_id, rank)]

    def add_to_server(self, server: grpc.Server) -> None:
        handler = grpc.stream_stream_rpc_method_handler(self.Exchange)  # bytes in, bytes out
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(frames.PEER_SERVICE,
                                                                              {"Exchange": handler}),))

    def Exchange(self, request_iterator, context):  # noqa: N802 - gRPC method name
        tls.require_role(context, "node")  # over TLS: streams from nodes only, not from the orchestrator
        try:
            hello = frames.decode_frame(next(request_iterator))
        except (StopIteration, grpc.RpcError):
            return iter(())  # the dialler went away before saying who it is
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad first frame: {e}")
        if not isinstance(hello, frames.Hello):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first frame of a peer stream must be a Hello")
        key = (hello.job_id, hello.dst)
        deadline = time.monotonic() + self.accept_timeout_s
        with self._cond:
            while key not in self._comms and context.is_active() and time.monotonic() < deadline:
                self._cond.wait(0.1)
            comm = self._comms.get(key)
        if comm is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"no rank {hello.dst} of job {hello.job_id!r} here within {self.accept_timeout_s:g} s")
        return comm.accept(hello, request_iterator, context)


class PeerServer:
    """A stand-alone gRPC server with a PeerHub, for ranks that run outside a node (tests, benchmarks).
    ``tls_dir``: serve mutual TLS with the node certificate there (testbed.comm.tls)."""

    def __init__(self, listen: str = "127.0.0.1:0", tls_dir: str | None = None):
        from testbed.comm.channels import join_hostport, split_hostport

        host, _ = split_hostport(listen, "listen")
        self.hub = PeerHub()
        self.server = make_server()
        self.hub.add_to_server(self.server)
        port = (self.server.add_secure_port(listen, tls.server_credentials(tls_dir)) if tls_dir
                else self.server.add_insecure_port(listen))
        self.address = join_hostport(host, port)
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=None)

    def __enter__(self) -> "PeerServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _rpc_text(e: grpc.RpcError) -> str:
    code = e.code() if hasattr(e, "code") else None
    if code is None:  # the accepting side's request iterator raises a bare RpcError
        return "the RPC was cancelled or its connection lost"
    details = e.details() if hasattr(e, "details") else None
    return code.name if details in (None, "", code.name) else f"{code.name}: {details}"
