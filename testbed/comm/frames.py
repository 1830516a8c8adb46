"""Peer stream frames: peer.proto's Frame (Hello, Chunk, Bye) as raw bytes.

Peer streams carry raw bytes in protobuf's wire format. Hello and Bye go through
peer_pb2; Chunk frames, the hot path, are encoded and decoded here by hand (tests check
the bytes against peer_pb2 both ways), because protobuf messages take payloads only as
bytes objects: that would cost two extra copies of every payload on each side, while by
hand a chunk costs one copy to send and none to parse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from testbed.proto import peer_pb2

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


def encode_chunks(src: int, tag: int, data: bytes | bytearray | memoryview | Sequence, chunk_bytes: int
                  ) -> Iterator[bytes]:
    """One message as Frame(chunk=...) bytes of at most ``chunk_bytes`` payload each (at least one).

    ``data``: the message, or the buffers whose concatenation it is (a tensor's header and body:
    each byte is then copied once, into its frame, and never joined beforehand)."""
    parts = [memoryview(data).cast("B")] if isinstance(data, (bytes, bytearray, memoryview)) else [
        memoryview(p).cast("B") for p in data]
    total = sum(len(p) for p in parts)
    count = max(1, -(-total // chunk_bytes))
    pieces: list[memoryview] = []  # the current chunk's slices of the parts
    room, i = min(chunk_bytes, total), 0
    for part in parts:
        pos = 0
        while pos < len(part):
            take = part[pos:pos + room]
            pieces.append(take)
            pos, room = pos + len(take), room - len(take)
            if room == 0:
                yield _encode_chunk(src, tag, i, count, total, pieces)
                i, pieces = i + 1, []
                room = min(chunk_bytes, total - i * chunk_bytes)
    if i < count:  # an empty message: one empty chunk
        yield _encode_chunk(src, tag, i, count, total, pieces)


def _encode_chunk(src: int, tag: int, index: int, count: int, total: int, payload: list[memoryview]) -> bytes:
    head = bytearray()
    size = sum(len(p) for p in payload)
    for key, value in zip(_INT_KEYS, (src, tag, index, count, total)):
        if value:  # proto3 leaves zero scalars out, as SerializeToString does
            head.append(key)
            head += _varint(value)
    if size:
        head += _PAYLOAD_KEY + _varint(size)
    return b"".join((_CHUNK_KEY, _varint(len(head) + size), head, *payload))


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


