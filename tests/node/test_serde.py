"""Records and frames survive the trip through protobuf unchanged; bad jobs are named."""

from __future__ import annotations

import json

import pytest
import torch

from testbed.comm.serde import tensor_to_bytes
from testbed.comm.trace import Collective, Compute, Trace
from testbed.errors import ConfigError
from testbed.job import JobSpec
from testbed.node import serde
from testbed.node.records import LoadArgs, NodeStats, RankResult
from testbed.proto import node_pb2, peer_pb2


def wire(msg):
    """Serialize and parse again, as the network does."""
    return type(msg).FromString(msg.SerializeToString())


def test_load_request_round_trip():
    job = JobSpec(model="vit-tiny", method="astra", world_size=3, tokens=17, params={"groups": 2}, threads=2)
    args = LoadArgs("j1", job, 2, ["10.0.0.1:5000", "10.0.0.2:5000", "[::1]:7"], 9.5, 2.0)
    assert serde.read_load_request(wire(serde.load_request(args))) == args


def test_unknown_job_field_is_a_config_error_naming_it():
    req = node_pb2.LoadJobRequest(job_json=json.dumps({"model": "vit-tiny", "method": "single", "colour": 1}))
    with pytest.raises(ConfigError, match="colour") as info:
        serde.read_load_request(req)
    assert info.value.field == "job"
    with pytest.raises(ConfigError) as info:
        serde.read_load_request(node_pb2.LoadJobRequest(job_json="{not json"))
    assert info.value.field == "job_json"


@pytest.mark.parametrize("output", [None, torch.arange(12, dtype=torch.float32).reshape(3, 4)])
def test_infer_response_round_trip(output):
    trace = Trace(1, [Compute(0.5), Collective("all_gather", [("send", 0, 64), ("recv", 0, 64)], 0.2, 0.1, 0.01)])
    r = RankResult(rank=1, output=output, wall_s=0.7, compute_s=0.5, comm_s=0.2, wait_s=0.1, serialize_s=0.01,
                   bytes_sent=64, bytes_recv=64, trace=trace)
    back = serde.read_infer_response(wire(serde.infer_response(r)), address="h:1")
    assert back.address == "h:1" and back.trace.to_dict() == trace.to_dict()
    assert (back.output is None) == (output is None)
    if output is not None:
        assert torch.equal(back.output, output) and back.output.dtype == output.dtype
    for name in ("rank", "wall_s", "compute_s", "comm_s", "wait_s", "serialize_s", "bytes_sent", "bytes_recv"):
        assert getattr(back, name) == getattr(r, name)


def test_stats_round_trip():
    s = NodeStats(pid=7, listen_addresses=["a:1", "b:2"], job_id="j", rank=3, inferences=5, uptime_s=1.5,
                  max_rss_kib=1024)
    assert serde.read_stats_response(wire(serde.stats_response(s))) == s


@pytest.mark.parametrize("size,chunk", [(0, 4), (3, 4), (4, 4), (9, 4), (1 << 16, 1000), (300, 1 << 20)])
@pytest.mark.parametrize("src,tag", [(0, 0), (2, 77), (63, (1 << 40) + 5)])
def test_hand_encoded_chunks_are_exactly_what_protobuf_makes(size, chunk, src, tag):
    data = bytes(i % 251 for i in range(size))
    wires = list(serde.encode_chunks(src, tag, data, chunk))
    assert len(wires) == max(1, -(-size // chunk))
    pieces = [data[i * chunk:(i + 1) * chunk] for i in range(len(wires))]
    for i, (w, piece) in enumerate(zip(wires, pieces)):
        pb = peer_pb2.Frame(chunk=peer_pb2.Chunk(src=src, tag=tag, index=i, count=len(wires), total_bytes=size,
                                                 payload=piece))
        assert w == pb.SerializeToString()  # byte for byte, so either side may use either codec
        got = serde.decode_frame(w)
        assert (got.src, got.tag, got.index, got.count, got.total_bytes) == (src, tag, i, len(wires), size)
        assert bytes(got.payload) == piece and len(got.payload) <= chunk


def test_chunks_of_a_tensor_reassemble_to_the_same_bytes():
    data = tensor_to_bytes(torch.arange(1000, dtype=torch.float64))
    frames = [serde.decode_frame(w) for w in serde.encode_chunks(1, 9, data, 777)]
    assert b"".join(bytes(f.payload) for f in frames) == data


def test_hello_bye_and_malformed_frames():
    assert serde.decode_frame(serde.encode_hello("j", 0, 3)) == serde.Hello("j", 0, 3)
    assert serde.decode_frame(serde.encode_bye()) == serde.Bye()
    with pytest.raises(ValueError):
        serde.decode_frame(peer_pb2.Frame().SerializeToString())  # no kind
    with pytest.raises(Exception):
        serde.decode_frame(b"\x12\x05\x08")  # truncated
