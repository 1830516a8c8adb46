"""Peer frames: the hand-encoded chunks are byte for byte what protobuf makes; bad frames are refused."""

from __future__ import annotations

import pytest
import torch

from testbed.comm import frames
from testbed.comm.serde import encode_tensor, tensor_to_bytes
from testbed.proto import peer_pb2


@pytest.mark.parametrize("size,chunk", [(0, 4), (3, 4), (4, 4), (9, 4), (1 << 16, 1000), (300, 1 << 20)])
@pytest.mark.parametrize("src,tag", [(0, 0), (2, 77), (63, (1 << 40) + 5)])
def test_hand_encoded_chunks_are_exactly_what_protobuf_makes(size, chunk, src, tag):
    data = bytes(i % 251 for i in range(size))
    wires = list(frames.encode_chunks(src, tag, data, chunk))
    assert len(wires) == max(1, -(-size // chunk))
    pieces = [data[i * chunk:(i + 1) * chunk] for i in range(len(wires))]
    for i, (w, piece) in enumerate(zip(wires, pieces)):
        pb = peer_pb2.Frame(chunk=peer_pb2.Chunk(src=src, tag=tag, index=i, count=len(wires), total_bytes=size,
                                                 payload=piece))
        assert w == pb.SerializeToString()  # byte for byte, so either side may use either codec
        got = frames.decode_frame(w)
        assert (got.src, got.tag, got.index, got.count, got.total_bytes) == (src, tag, i, len(wires), size)
        assert bytes(got.payload) == piece and len(got.payload) <= chunk


def test_chunks_of_a_tensor_reassemble_to_the_same_bytes():
    data = tensor_to_bytes(torch.arange(1000, dtype=torch.float64))
    got = [frames.decode_frame(w) for w in frames.encode_chunks(1, 9, data, 777)]
    assert b"".join(bytes(f.payload) for f in got) == data


@pytest.mark.parametrize("numel,chunk", [(0, 5), (1, 5), (7, 5), (1000, 777), (1000, 8002), (3, 1 << 20)])
def test_a_tensor_framed_from_its_header_and_body_is_framed_as_its_joined_bytes(numel, chunk):
    enc = encode_tensor(torch.arange(numel, dtype=torch.float64))
    joined = b"".join(enc)
    assert joined == tensor_to_bytes(torch.arange(numel, dtype=torch.float64)) and len(joined) == enc.nbytes
    assert list(frames.encode_chunks(3, 11, enc, chunk)) == list(frames.encode_chunks(3, 11, joined, chunk))


def test_hello_bye_and_malformed_frames():
    assert frames.decode_frame(frames.encode_hello("j", 0, 3)) == frames.Hello("j", 0, 3)
    assert frames.decode_frame(frames.encode_bye()) == frames.Bye()
    with pytest.raises(ValueError):
        frames.decode_frame(peer_pb2.Frame().SerializeToString())  # no kind
    with pytest.raises(Exception):
        frames.decode_frame(b"\x12\x05\x08")  # truncated
