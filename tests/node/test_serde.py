"""Records and frames survive the trip through protobuf unchanged; bad jobs are named."""

from __future__ import annotations

import json

import pytest
import torch

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


@pytest.mark.parametrize("size,chunk", [(0, 4), (3, 4), (4, 4), (9, 4), (1 << 16, 1000)])
def test_chunk_frames_cut_and_carry_a_message_exactly(size, chunk):
    data = bytes(i % 251 for i in range(size))
    frames = [serde.read_frame(wire(f)) for f in serde.chunk_frames(2, 77, data, chunk)]
    assert len(frames) == max(1, -(-size // chunk))
    assert [f.index for f in frames] == list(range(len(frames)))
    assert all(f.count == len(frames) and f.total_bytes == size and f.src == 2 and f.tag == 77 for f in frames)
    assert all(len(f.payload) <= chunk for f in frames)
    assert b"".join(f.payload for f in frames) == data


def test_hello_bye_and_empty_frames():
    assert serde.read_frame(wire(serde.hello_frame("j", 0, 3))) == serde.Hello("j", 0, 3)
    assert serde.read_frame(wire(serde.bye_frame())) == serde.Bye()
    with pytest.raises(ValueError):
        serde.read_frame(peer_pb2.Frame())
