"""The control plane's protobuf messages: node records and tensors <-> node_pb2.

The data plane's peer frames are encoded in testbed.comm.frames. Tensors travel in testbed.comm.serde's format (dtype code, shape, raw bytes), the
same bytes the in-process transport moves, so gRPC runs reproduce in-process runs
bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import fields

from testbed.comm.serde import bytes_to_tensor, tensor_to_bytes
from testbed.comm.trace import Trace
from testbed.errors import ConfigError, check
from testbed.methods.job import JobSpec
from testbed.net.profile import LinkProfile
from testbed.node.records import LoadArgs, LoadTimes, NodeStats, RankResult
from testbed.proto import node_pb2

# -- control plane: LoadJob -------------------------------------------------------


def load_request(args: LoadArgs) -> node_pb2.LoadJobRequest:
    return node_pb2.LoadJobRequest(job_id=args.job_id, job_json=json.dumps(args.job.to_dict()), rank=args.rank,
                                   peer_data_addresses=args.peers, comm_timeout_s=args.comm_timeout_s,
                                   connect_timeout_s=args.connect_timeout_s, codebooks=args.codebooks)


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
                    connect_timeout_s=req.connect_timeout_s,
                    codebooks=req.codebooks if req.HasField("codebooks") else None)


def load_response(times: LoadTimes) -> node_pb2.LoadJobResponse:
    return node_pb2.LoadJobResponse(build_s=times.build_s, connect_s=times.connect_s, rss_kib=times.rss_kib,
                                    pss_kib=times.pss_kib)


def read_load_response(resp: node_pb2.LoadJobResponse) -> LoadTimes:
    return LoadTimes(build_s=resp.build_s, connect_s=resp.connect_s, rss_kib=resp.rss_kib,
                     pss_kib=resp.pss_kib if resp.HasField("pss_kib") else None)


# -- control plane: Infer, Stats, Shutdown ---------------------------------------


def infer_request(job_id: str) -> node_pb2.InferRequest:
    return node_pb2.InferRequest(job_id=job_id)


def read_infer_request(req: node_pb2.InferRequest) -> str:
    return req.job_id


def infer_response(r: RankResult) -> node_pb2.InferResponse:
    resp = node_pb2.InferResponse(rank=r.rank, wall_s=r.wall_s, compute_s=r.compute_s, comm_s=r.comm_s,
                                  wait_s=r.wait_s, serialize_s=r.serialize_s, bytes_sent=r.bytes_sent,
                                  bytes_recv=r.bytes_recv, trace_json=json.dumps(r.trace.to_dict()),
                                  token_times_s=r.token_times_s, rss_kib=r.rss_kib, pss_kib=r.pss_kib)
    if r.output is not None:
        resp.output = tensor_to_bytes(r.output)
    if r.generated is not None:
        resp.generated = tensor_to_bytes(r.generated)
    return resp


def read_infer_response(resp: node_pb2.InferResponse, address: str = "") -> RankResult:
    output = bytes_to_tensor(resp.output) if resp.HasField("output") else None
    return RankResult(rank=resp.rank, output=output, wall_s=resp.wall_s, compute_s=resp.compute_s,
                      comm_s=resp.comm_s, wait_s=resp.wait_s, serialize_s=resp.serialize_s,
                      bytes_sent=resp.bytes_sent, bytes_recv=resp.bytes_recv,
                      trace=Trace.from_dict(json.loads(resp.trace_json)), address=address,
                      token_times_s=list(resp.token_times_s),
                      generated=bytes_to_tensor(resp.generated) if resp.HasField("generated") else None,
                      rss_kib=resp.rss_kib, pss_kib=resp.pss_kib if resp.HasField("pss_kib") else None)


def stats_request(data_host: str = "") -> node_pb2.StatsRequest:
    return node_pb2.StatsRequest(data_host=data_host)


def read_stats_request(req: node_pb2.StatsRequest) -> str:
    return req.data_host


def stats_response(s: NodeStats) -> node_pb2.StatsResponse:
    return node_pb2.StatsResponse(pid=s.pid, listen_addresses=s.listen_addresses, job_id=s.job_id, rank=s.rank,
                                  inferences=s.inferences, uptime_s=s.uptime_s, max_rss_kib=s.max_rss_kib,
                                  package_version=s.package_version, protocol_version=s.protocol_version,
                                  hostname=s.hostname, kernel=s.kernel, cpu_model=s.cpu_model,
                                  cpu_count=s.cpu_count, data_interface=s.data_interface, tx_bytes=s.tx_bytes,
                                  rx_bytes=s.rx_bytes, net_id=s.net_id)


def read_stats_response(resp: node_pb2.StatsResponse) -> NodeStats:
    return NodeStats(pid=resp.pid, listen_addresses=list(resp.listen_addresses), job_id=resp.job_id,
                     rank=resp.rank, inferences=resp.inferences, uptime_s=resp.uptime_s,
                     max_rss_kib=resp.max_rss_kib, package_version=resp.package_version,
                     protocol_version=resp.protocol_version, hostname=resp.hostname, kernel=resp.kernel,
                     cpu_model=resp.cpu_model, cpu_count=resp.cpu_count, data_interface=resp.data_interface,
                     tx_bytes=resp.tx_bytes if resp.HasField("tx_bytes") else None,
                     rx_bytes=resp.rx_bytes if resp.HasField("rx_bytes") else None, net_id=resp.net_id)


def probe_request(runs: int) -> node_pb2.ProbeRequest:
    return node_pb2.ProbeRequest(runs=runs)


def read_probe_request(req: node_pb2.ProbeRequest) -> int:
    """The timed runs asked for; raises ConfigError outside 1..1000."""
    check(1 <= req.runs <= 1000, "runs", req.runs, "1..1000 timed runs of the probe block")
    return req.runs


def probe_response(cpu_s: float) -> node_pb2.ProbeResponse:
    return node_pb2.ProbeResponse(cpu_s=cpu_s)


def read_probe_response(resp: node_pb2.ProbeResponse) -> float:
    return resp.cpu_s


def shutdown_request(reason: str) -> node_pb2.ShutdownRequest:
    return node_pb2.ShutdownRequest(reason=reason)


def read_shutdown_request(req: node_pb2.ShutdownRequest) -> str:
    return req.reason


def shutdown_response() -> node_pb2.ShutdownResponse:
    return node_pb2.ShutdownResponse()


def unload_request(reason: str) -> node_pb2.UnloadRequest:
    return node_pb2.UnloadRequest(reason=reason)


def read_unload_request(req: node_pb2.UnloadRequest) -> str:
    return req.reason


def unload_response() -> node_pb2.UnloadResponse:
    return node_pb2.UnloadResponse()


# -- control plane: Shape ------------------------------------------------------------


def shape_request(links: dict[str, LinkProfile]) -> node_pb2.ShapeRequest:
    return node_pb2.ShapeRequest(links=[node_pb2.PeerLink(peer=peer, profile_json=json.dumps(prof.to_dict()))
                                        for peer, prof in links.items()])


def read_shape_request(req: node_pb2.ShapeRequest) -> dict[str, LinkProfile]:
    """Peer -> profile; raises ConfigError naming the entry for bad JSON, unknown fields, bad values
    or a peer given twice."""
    out: dict[str, LinkProfile] = {}
    for i, link in enumerate(req.links):
        where = f"links[{i}]"
        if link.peer in out:
            raise ConfigError(f"{where}.peer", link.peer, "each peer once")
        try:
            d = json.loads(link.profile_json) if link.profile_json else {}
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}.profile_json", link.profile_json[:80],
                              f"a JSON object of LinkProfile fields ({e})") from None
        out[link.peer] = LinkProfile.from_dict(d, f"{where}.profile")
    return out


def shape_response(apply_s: float, mechanism: str) -> node_pb2.ShapeResponse:
    return node_pb2.ShapeResponse(apply_s=apply_s, mechanism=mechanism)


def read_shape_response(resp: node_pb2.ShapeResponse) -> tuple[float, str]:
    return resp.apply_s, resp.mechanism
