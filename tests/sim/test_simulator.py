"""One cell on the simulator: per-rank results, profiles measured or extrapolated."""

from __future__ import annotations

import json
import statistics

import pytest

from testbed.comm.trace import Collective, Compute, Trace
from testbed.errors import ConfigError
from testbed.net.profile import LinkProfile
from testbed.sim.calibrate import CLOCK
from testbed.sim.engine import simulate
from testbed.sim.network import Network, SimTopology, TcpModel, WireModel
from testbed.sim.profiles import ComputeProfile, ProfileKey, ProfileStore, code_fingerprint
from testbed.sim.simulator import SimConfig, Simulator, speed_from_device
from testbed.sim.synth import skeleton


@pytest.fixture
def sim(tmp_path):
    return Simulator(SimConfig(calibration_dir=str(tmp_path / "cal"), max_measure_tokens=33, max_measure_nodes=4,
                               calibration_repetitions=1, calibration_warmup=0, wire=WireModel()))


def cell(**kw):
    base = dict(model="vit-tiny", method="sequence_parallel", params={}, tokens=17, nodes=2, topology="star",
                profile=LinkProfile(10, 5), repetitions=2)
    return {**base, **kw}


def key_of(c: dict) -> ProfileKey:
    return ProfileKey.of(c["model"], c["method"], c["params"], c["tokens"], c["nodes"])


def test_results_have_the_rows_figures(sim):
    results = sim.results(**cell())
    assert len(results) == 2 and sim.mechanism(key_of(cell())) == "sim/measured"
    for r in results:
        crit = r.critical
        assert r.latency_s >= crit.compute_s > 0 and crit.comm_s > 0 and len(r.ranks) == 2
        # 2 blocks; per block every token's h (D=64, fp32) goes once to the other rank
        assert r.bytes_on_wire > r.bytes_sent == sum(s.bytes_sent for s in r.ranks) == 2 * 17 * 64 * 4
    assert results[0].latency_s == results[1].latency_s  # no loss or jitter: deterministic


def test_large_cells_are_extrapolated_and_marked(sim, tmp_path):
    c = cell(method="astra", params={"groups": 2, "codebook_size": 16}, tokens=257, nodes=8)
    assert len(sim.results(**c)) == 2
    assert sim.mechanism(key_of(c)) == "sim/extrapolated"
    files = sorted(p.name for p in (tmp_path / "cal").glob("*.json"))
    assert len(files) >= 2 and all("astra" in f for f in files)  # the measured basis was stored
    stored = [json.loads(p.read_text()) for p in (tmp_path / "cal").glob("*.json")]
    assert all(not s["extrapolated"] and s["key"]["tokens"] <= 33 for s in stored)
    probes = [s["meta"]["host_probe_s"] for s in stored]  # each measured profile: the host's speed then
    assert min(probes) > 0 and sim.profile(key_of(c)).meta["host_probe_s"] == pytest.approx(statistics.median(probes))


def test_invalid_cells_raise_naming_the_field(sim):
    with pytest.raises(ConfigError) as e:
        sim.results(**cell(method="tensor_parallel", nodes=3))
    assert "world_size" in str(e.value) and "n_heads" in str(e.value)
    with pytest.raises(ConfigError) as e:
        sim.results(**cell(topology="ring"))
    assert "topology" in str(e.value)


def test_bad_arguments_raise_config_error(sim):
    with pytest.raises(ConfigError):
        sim.results(**cell(profile={"bandwidth_mbps": 10}))
    with pytest.raises(ConfigError):
        sim.results(**cell(repetitions=0))
    with pytest.raises(ConfigError):
        SimConfig(max_measure_tokens=0)
    with pytest.raises(ConfigError):
        SimConfig(tcp="reno")


def test_loss_makes_repetitions_differ(sim):
    results = sim.results(**cell(profile=LinkProfile(10, 5, loss_pct=10), repetitions=8))
    lat = [r.latency_s for r in results]
    assert len(set(lat)) > 1
    clean = sim.results(**cell(repetitions=1))[0].latency_s
    assert min(lat) >= clean


def test_speed_from_device():
    assert speed_from_device(None) == 1.0
    assert speed_from_device(1.0) == 1.0
    assert speed_from_device(0.25) == 4.0  # a core four times slower than this host's
    assert speed_from_device(2.0) == 0.5
    for bad in (0.0, -1.0, True):
        with pytest.raises(ConfigError):
            speed_from_device(bad)


def all_gather(n: int, nbytes: int) -> list[Trace]:
    return [Trace(r, [Collective("all_gather", [("send", (r + i) % n, nbytes) for i in range(1, n)]
                                 + [("recv", (r + i) % n, nbytes) for i in range(1, n)])]) for r in range(n)]


@pytest.mark.parametrize("kind", ["star", "mesh", "line", "shared_medium"])
def test_topology_files_and_kinds_give_the_same_network(kind):
    topo_mod = pytest.importorskip("testbed.net.topology")
    try:
        topo = topo_mod.load_topology(kind)
    except ConfigError:
        pytest.skip(f"topologies/{kind}.yaml not there")
    prof = LinkProfile(20, 4, loss_pct=2)
    from_file = Network(topo, len(topo.hosts), prof)
    from_kind = Network(SimTopology(kind, len(topo.hosts), prof))
    for a in range(from_kind.n):
        for b in range(from_kind.n):
            if a != b:
                assert from_file.one_way_s(a, b) == pytest.approx(from_kind.one_way_s(a, b))
                assert from_file.loss(a, b) == pytest.approx(from_kind.loss(a, b))
                assert from_file.bottleneck_bps(a, b) == from_kind.bottleneck_bps(a, b)
    tcp = TcpModel(mode="steady", loss_mode="expected")
    lat = [simulate(all_gather(from_kind.n, 100_000), net, WireModel(), tcp).latency_s for net in (from_file, from_kind)]
    assert lat[0] == pytest.approx(lat[1], rel=1e-12)


def stored_profile(root, method: str, nodes: int, compute_s: list[float], **meta) -> None:
    """A profile with known compute per rank (one segment before each collective, one after)."""
    sk = skeleton("vit-tiny", method, {}, 17, nodes)
    traces = []
    for r in range(nodes):
        events = []
        for c in sk.collectives[r]:
            events += [Compute(compute_s[r]), c]
        traces.append(Trace(r, events + [Compute(compute_s[r])]))
    meta = {"code": code_fingerprint(), "clock": CLOCK, **meta}
    ProfileStore(root).put(ComputeProfile(ProfileKey.of("vit-tiny", method, {}, 17, nodes), traces, meta=meta))


def test_shared_cores_stretch_the_busy_ranks(tmp_path):
    cal = tmp_path / "cal"
    stored_profile(cal, "sequence_parallel", 4, [0.01] * 4)
    stored_profile(cal, "single", 4, [0.01, 0, 0, 0])
    cfg = dict(calibration_dir=str(cal), measure_missing=False, wire=WireModel())
    alone, shared = Simulator(SimConfig(**cfg)), Simulator(SimConfig(**cfg, shared_cpus=2))
    sp = cell(method="sequence_parallel", nodes=4, repetitions=1)
    a, b = alone.results(**sp)[0], shared.results(**sp)[0]
    assert b.critical.compute_s == pytest.approx(2 * a.critical.compute_s)  # 4 busy ranks on 2 cores
    single = cell(method="single", nodes=4, repetitions=1)
    assert shared.results(**single)[0].latency_s == pytest.approx(alone.results(**single)[0].latency_s)
    with pytest.raises(ConfigError):
        SimConfig(shared_cpus=0)


def test_host_scale_multiplies_compute_and_nothing_else(tmp_path):
    cal = tmp_path / "cal"
    stored_profile(cal, "single", 4, [0.01, 0, 0, 0])
    stored_profile(cal, "sequence_parallel", 4, [0.01] * 4)
    sim = Simulator(SimConfig(calibration_dir=str(cal), measure_missing=False, wire=WireModel()))
    single = cell(method="single", nodes=4, repetitions=1)
    assert sim.results(**single, host_scale=1.3)[0].latency_s == pytest.approx(1.3 * sim.results(**single)[0].latency_s)
    sp = cell(method="sequence_parallel", nodes=4, repetitions=1)
    a, b = sim.results(**sp)[0], sim.results(**sp, host_scale=1.3)[0]
    assert b.critical.compute_s == pytest.approx(1.3 * a.critical.compute_s) and b.bytes_on_wire == a.bytes_on_wire
    with pytest.raises(ConfigError, match="host_scale"):
        sim.results(**single, host_scale=0)


def test_default_wire_takes_the_measured_per_message_cost(tmp_path):
    sim = Simulator(SimConfig(calibration_dir=str(tmp_path / "cal")))
    assert sim.wire.per_message_s > 0  # the gRPC transport measured on loopback, then stored
    stored = json.loads((tmp_path / "cal" / "transport" / "grpc.json").read_text())
    assert stored["per_message_s"] == sim.wire.per_message_s and stored["bulk_bytes_per_s"] > 0
    assert sim.wire.stack_bytes_per_s == stored["bulk_bytes_per_s"]
    again = Simulator(SimConfig(calibration_dir=str(tmp_path / "cal"), measure_missing=False))
    assert again.wire.per_message_s == sim.wire.per_message_s
    assert Simulator(SimConfig(calibration_dir=str(tmp_path / "none"), measure_missing=False)).wire.per_message_s == 0


def test_stale_profiles_are_measured_again(tmp_path):
    cal = tmp_path / "cal"
    stored_profile(cal, "sequence_parallel", 2, [5.0, 5.0])  # 5 s per segment: clearly not this host
    store = ProfileStore(cal)
    key = ProfileKey.of("vit-tiny", "sequence_parallel", {}, 17, 2)
    old = store.get(key)
    store.put(ComputeProfile(key, old.traces, meta={"code": "other"}))
    sim = Simulator(SimConfig(calibration_dir=str(cal), calibration_repetitions=1, wire=WireModel()))
    res = sim.results(**cell(repetitions=1))[0]
    assert res.critical.compute_s < 5.0 and not store.get(key).stale


def test_auto_all_reduce_is_settled_by_the_simulated_topology():
    from testbed.net.topology import load_topology
    from testbed.sim.simulator import Simulator

    def algo(topology, tokens=4096, nodes=4):
        return Simulator.settle("vit-tiny", "tensor_parallel", {}, tokens, nodes, 1, topology)["all_reduce"]

    assert [algo(k) for k in ("star", "mesh", "shared_medium", "line")] == ["direct", "direct", "direct", "ring"]
    assert algo("line", tokens=11) == "direct"  # latency-bound chunks: direct even over shared hops
    assert algo("line", nodes=2) == "direct"
    assert load_topology("star").is_flat() and not load_topology("line").is_flat()
    assert algo(load_topology("line")) == "ring" and algo(load_topology("star")) == "direct"
    assert Simulator.settle("vit-tiny", "tensor_parallel", {"all_reduce": "ring"}, 11, 4, 1, "star") == {
        "all_reduce": "ring"}
