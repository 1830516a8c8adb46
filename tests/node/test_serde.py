"""Records survive the trip through protobuf unchanged; bad jobs are named."""

from __future__ import annotations

import json

import pytest
import torch

from testbed.comm.trace import Collective, Compute, Trace
from testbed.errors import ConfigError
from testbed.methods.job import JobSpec
from testbed.node import serde
from testbed.node.records import LoadArgs, LoadTimes, NodeStats, RankResult
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
@pytest.mark.parametrize("decode", [False, True])
def test_infer_response_round_trip(output, decode):
    trace = Trace(1, [Compute(0.5), Collective("all_gather", [("send", 0, 64), ("recv", 0, 64)], 0.2, 0.1, 0.01)])
    times = [0.25, 0.3125, 0.375] if decode else []
    ids = torch.tensor([[5, 7, 11]]) if decode and output is not None else None
    r = RankResult(rank=1, output=output, wall_s=0.7, compute_s=0.5, comm_s=0.2, wait_s=0.1, serialize_s=0.01,
                   bytes_sent=64, bytes_recv=64, trace=trace, token_times_s=times, generated=ids,
                   rss_kib=123456 if decode else 0, pss_kib=65432 if decode else None)
    back = serde.read_infer_response(wire(serde.infer_response(r)), address="h:1")
    assert back.address == "h:1" and back.trace.to_dict() == trace.to_dict()
    assert (back.output is None) == (output is None)
    if output is not None:
        assert torch.equal(back.output, output) and back.output.dtype == output.dtype
    assert back.token_times_s == times
    assert (back.generated is None) == (ids is None)
    if ids is not None:
        assert torch.equal(back.generated, ids) and back.generated.dtype == ids.dtype
    for name in ("rank", "wall_s", "compute_s", "comm_s", "wait_s", "serialize_s", "bytes_sent", "bytes_recv", "rss_kib",
                 "pss_kib"):
        assert getattr(back, name) == getattr(r, name)


@pytest.mark.parametrize("pss", [None, 0, 2048])
def test_load_response_round_trip_with_memory(pss):
    t = LoadTimes(build_s=1.5, connect_s=0.25, rss_kib=4096, pss_kib=pss)
    assert serde.read_load_response(wire(serde.load_response(t))) == t


def test_stats_round_trip():
    s = NodeStats(pid=7, listen_addresses=["a:1", "b:2"], job_id="j", rank=3, inferences=5, uptime_s=1.5,
                  max_rss_kib=1024)
    assert serde.read_stats_response(wire(serde.stats_response(s))) == s
