"""The only code that touches protobuf messages: records and tensors <-> pb2.

Tensors travel in testbed.comm.serde's format (dtype code, shape, raw bytes), the
same bytes the in-process transport moves, so gRPC runs reproduce in-process runs
bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Iterator

from testbed.comm.serde import bytes_to_tensor, tensor_to_bytes
from testbed.comm.trace import Trace
from testbed.errors import ConfigError
from testbed.job import JobSpec
from testbed.node.records import LoadArgs, LoadTimes, NodeStats, RankResult
from testbed.proto import node_pb2, peer_pb2

# -- data plane ---------------------------------------------------------------
# Peer streams carry raw bytes in protobuf's wire format for peer.proto's Frame. Hello
# and Bye go through peer_pb2; Chunk frames, the hot path, are encoded and decoded here
# by hand (tests check the bytes against peer_pb2 both ways), because protobuf messages
# take payloads only as bytes objects: that would cost two extra copies of every payload
# on each side, while by hand a chunk costs one copy to send and none to parse.

PEER_SERVICE = peer_pb2.DESCRIPTOR.services_by_name["Peer"].full_name  # "testbed.peer.Peer"
EXCHANGE_METHOD = f"/{PEER_SERVICE}/Exchange"

_CHUNK_KEY = b"\x12"  # Frame.chunk: field 2, length-delimited
_PAYLOAD_KEY = b"\x32"  # Chunk.payload: field 6, length-delimited
_INT_KEYS = (0x08, 0x10, 0x18, 0x20, 0x28)  # Chunk.src, tag, index, count, total_bytes: varints


@dataclass(frozen=True)
class Hello:
    job_id: str
    src: int
    dst: int


@dataclass(frozen=True)
class Bye:
    pass


@dataclass(frozen=True)
class Chunk:
    src: int
    tag: int
    index: int
    count: int
    total_bytes: int
    payload: bytes | memoryview  # a view into the received frame (no copy)


def encode_hello(job_id: str, src: int, dst: int) -> bytes:
    return peer_pb2.Frame(hello=peer_pb2.Hello(job_id=job_id, src=src, dst=dst)).SerializeToString()


def encode_bye() -> bytes:
    return peer_pb2.Frame(bye=peer_pb2.Bye()).SerializeToString()


def encode_chunks(src: int, tag: int, data: bytes | bytearray | memoryview, chunk_bytes: int) -> Iterator[bytes]:
    """One message as Frame(chunk=...) bytes of at most ``chunk_bytes`` payload each (at least one)."""
    view = memoryview(data).cast("B")
    total = len(view)
    count = max(1, -(-total // chunk_bytes))
    for i in range(count):
        yield _encode_chunk(src, tag, i, count, total, view[i * chunk_bytes:(i + 1) * chunk_bytes])


def _encode_chunk(src: int, tag: int, index: int, count: int, total: int, payload: memoryview) -> bytes:
    head = bytearray()
    for key, value in zip(_INT_KEYS, (src, tag, index, count, total)):
        if value:  # proto3 leaves zero scalars out, as SerializeToString does
            head.append(key)
            head += _varint(value)
    if len(payload):
        head += _PAYLOAD_KEY + _varint(len(payload))
    return b"".join((_CHUNK_KEY, _varint(len(head) + len(payload)), head, payload))


def decode_frame(data: bytes) -> Hello | Chunk | Bye:
    """Parse one Frame. Raises ValueError for an empty or malformed frame."""
    if data[:1] == _CHUNK_KEY:
        length, pos = _read_varint(data, 1)
        if pos + length == len(data):
            return _decode_chunk(data, pos)
    frame = peer_pb2.Frame.FromString(data)
    kind = frame.WhichOneof("kind")
    if kind == "hello":
        return Hello(frame.hello.job_id, frame.hello.src, frame.hello.dst)
    if kind == "bye":
        return Bye()
    if kind == "chunk":
        c = frame.chunk
        return Chunk(c.src, c.tag, c.index, c.count, c.total_bytes, c.payload)
    raise ValueError(f"empty peer frame (kind {kind!r})")


def _decode_chunk(data: bytes, pos: int) -> Chunk:
    ints, payload = [0] * 5, memoryview(b"")
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(data, pos)
            if 1 <= field <= 5:
                ints[field - 1] = value
        elif wire_type == 2:
            n, pos = _read_varint(data, pos)
            if field == 6:
                payload = memoryview(data)[pos:pos + n]
            pos += n
        else:
            raise ValueError(f"chunk frame: unexpected wire type {wire_type} for field {field}")
    if pos != len(data):
        raise ValueError("chunk frame: truncated")
    return Chunk(*ints, payload)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("chunk frame: bad varint")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


# -- control plane: LoadJob -------------------------------------------------------


def load_request(args: LoadArgs) -> node_pb2.LoadJobRequest:
    return node_pb2.LoadJobRequest(job_id=args.job_id, job_json=json.dumps(args.job.to_dict()), rank=args.rank,
                                   peer_data_addresses=args.peers, comm_timeout_s=args.comm_timeout_s,
                                   connect_timeout_s=args.connect_timeout_s)


def read_load_request(req: node_pb2.LoadJobRequest) -> LoadArgs:
    """Raises ConfigError for a job that does not parse or names unknown fields."""
    try:
        d = json.loads(req.job_json)
    except json.JSONDecodeError as e:
        raise ConfigError("job_json", req.job_json[:80], f"a JSON object of JobSpec fields ({e})") from None
    allowed = [f.name for f in fields(JobSpec)]
    if not isinstance(d, dict) or set(d) - set(allowed):
        bad = sorted(set(d) - set(allowed)) if isinstance(d, dict) else d
        raise ConfigError("job", bad, f"JobSpec fields: {', '.join(allowed)}")
    return LoadArgs(job_id=req.job_id, job=JobSpec.from_dict(d), rank=req.rank,
                    peers=list(req.peer_data_addresses), comm_timeout_s=req.comm_timeout_s,
                    connect_timeout_s=req.connect_timeout_s)


def load_response(times: LoadTimes) -> node_pb2.LoadJobResponse:
    return node_pb2.LoadJobResponse(build_s=times.build_s, connect_s=times.connect_s)


def read_load_response(resp: node_pb2.LoadJobResponse) -> LoadTimes:
    return LoadTimes(build_s=resp.build_s, connect_s=resp.connect_s)


# -- control plane: Infer, Stats, Shutdown ---------------------------------------


def infer_request(job_id: str) -> node_pb2.InferRequest:
    return node_pb2.InferRequest(job_id=job_id)


def read_infer_request(req: node_pb2.InferRequest) -> str:
    return req.job_id


def infer_response(r: RankResult) -> node_pb2.InferResponse:
    resp = node_pb2.InferResponse(rank=r.rank, wall_s=r.wall_s, compute_s=r.compute_s, comm_s=r.comm_s,
                                  wait_s=r.wait_s, serialize_s=r.serialize_s, bytes_sent=r.bytes_sent,
                                  bytes_recv=r.bytes_recv, trace_json=json.dumps(r.trace.to_dict()))
    if r.output is not None:
        resp.output = tensor_to_bytes(r.output)
    return resp


def read_infer_response(resp: node_pb2.InferResponse, address: str = "") -> RankResult:
    output = bytes_to_tensor(resp.output) if resp.HasField("output") else None
    return RankResult(rank=resp.rank, output=output, wall_s=resp.wall_s, compute_s=resp.compute_s,
                      comm_s=resp.comm_s, wait_s=resp.wait_s, serialize_s=resp.serialize_s,
                      bytes_sent=resp.bytes_sent, bytes_recv=resp.bytes_recv,
                      trace=Trace.from_dict(json.loads(resp.trace_json)), address=address)


def stats_request() -> node_pb2.StatsRequest:
    return node_pb2.StatsRequest()


def stats_response(s: NodeStats) -> node_pb2.StatsResponse:
    return node_pb2.StatsResponse(pid=s.pid, listen_addresses=s.listen_addresses, job_id=s.job_id, rank=s.rank,
                                  inferences=s.inferences, uptime_s=s.uptime_s, max_rss_kib=s.max_rss_kib)


def read_stats_response(resp: node_pb2.StatsResponse) -> NodeStats:
    return NodeStats(pid=resp.pid, listen_addresses=list(resp.listen_addresses), job_id=resp.job_id,
                     rank=resp.rank, inferences=resp.inferences, uptime_s=resp.uptime_s,
                     max_rss_kib=resp.max_rss_kib)


def shutdown_request(reason: str) -> node_pb2.ShutdownRequest:
    return node_pb2.ShutdownRequest(reason=reason)


def read_shutdown_request(req: node_pb2.ShutdownRequest) -> str:
    return req.reason


def shutdown_response() -> node_pb2.ShutdownResponse:
    return node_pb2.ShutdownResponse()
