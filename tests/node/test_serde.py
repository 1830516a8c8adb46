"""Records survive the trip through protobuf unchanged; bad jobs are named."""

from __future__ import annotations

import json

import pytest
import torch

from testbed.comm.trace import Collective, Compute, Trace
from testbed.errors import ConfigError
from testbed.methods.job import JobSpec
from testbed.node import serde
from testbed.node.records import LoadArgs, NodeStats, RankResult
from testbed.proto import node_pb2


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
