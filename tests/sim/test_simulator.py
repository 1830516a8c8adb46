"""One cell on the simulator: rows with the runner's columns, profiles measured or extrapolated."""

from __future__ import annotations

import json
import math

import pytest

from testbed.comm.trace import Collective, Compute, Trace
from testbed.errors import ConfigError
from testbed.net.profile import LinkProfile
from testbed.sim.engine import simulate
from testbed.sim.network import Network, SimTopology, TcpModel, WireModel
from testbed.sim.profiles import ComputeProfile, ProfileKey, ProfileStore, code_fingerprint
from testbed.sim.simulator import ROW_COLUMNS, SimConfig, Simulator, speed_from_device
from testbed.sim.synth import skeleton


@pytest.fixture
def sim(tmp_path):
    return Simulator(SimConfig(calibration_dir=str(tmp_path / "cal"), max_measure_tokens=33, max_measure_nodes=4,
                               calibration_repetitions=1, calibration_warmup=0, wire=WireModel()))


def cell(**kw):
    base = dict(model="vit-tiny", method="sequence_parallel", params={}, tokens=17, nodes=2, topology="star",
                profile=LinkProfile(10, 5), repetitions=2, experiment="t", cell="p0/m0")
    return {**base, **kw}


def test_rows_have_the_runner_columns(sim):
    rows = sim.run(**cell())
    assert len(rows) == 2 and [r["repetition"] for r in rows] == [0, 1]
    for r in rows:
        assert set(r) == set(ROW_COLUMNS)
        assert r["backend"] == "sim" and r["mechanism"] == "sim/measured" and r["status"] == "ok"
        assert math.isnan(r["agreement"]) and r["error"] == ""
        assert r["latency_s"] >= r["compute_s"] > 0 and r["comm_s"] > 0
        # 2 blocks; per block every token's h (D=64, fp32) goes once to the other rank
        assert r["bytes_on_wire"] > r["bytes_sent"] == 2 * 17 * 64 * 4
        assert (r["bandwidth_mbps"], r["delay_ms"], r["topology"], r["nodes"]) == (10, 5, "star", 2)
    assert rows[0]["latency_s"] == rows[1]["latency_s"]  # no loss or jitter: deterministic


def test_rows_fit_the_result_store(sim):
    store = pytest.importorskip("testbed.experiment.store")
    assert set(ROW_COLUMNS) <= set(store.COLUMNS)


def test_large_cells_are_extrapolated_and_marked(sim, tmp_path):
    rows = sim.run(**cell(method="astra", params={"groups": 2, "codebook_size": 16}, tokens=257, nodes=8))
    assert rows[0]["status"] == "ok", rows[0]["error"]
    assert rows[0]["mechanism"] == "sim/extrapolated"
    files = sorted(p.name for p in (tmp_path / "cal").glob("*.json"))
    assert len(files) >= 2 and all("astra" in f for f in files)  # the measured basis was stored
    stored = [json.loads(p.read_text()) for p in (tmp_path / "cal").glob("*.json")]
    assert all(not s["extrapolated"] and s["key"]["tokens"] <= 33 for s in stored)


def test_invalid_cells_give_error_rows_naming_the_field(sim):
    rows = sim.run(**cell(method="tensor_parallel", nodes=3))
    assert [r["status"] for r in rows] == ["error", "error"]
    assert "world_size" in rows[0]["error"] and "n_heads" in rows[0]["error"]
    rows = sim.run(**cell(topology="ring"))
    assert rows[0]["status"] == "error" and "topology" in rows[0]["error"]


def test_bad_arguments_raise_config_error(sim):
    with pytest.raises(ConfigError):
        sim.run(**cell(profile={"bandwidth_mbps": 10}))
    with pytest.raises(ConfigError):
        sim.run(**cell(repetitions=0))
    with pytest.raises(ConfigError):
        SimConfig(max_measure_tokens=0)
    with pytest.raises(ConfigError):
        SimConfig(tcp="reno")


def test_loss_makes_repetitions_differ(sim):
    rows = sim.run(**cell(profile=LinkProfile(10, 5, loss_pct=10), repetitions=8))
    lat = [r["latency_s"] for r in rows]
    assert len(set(lat)) > 1
    clean = sim.run(**cell(repetitions=1))[0]["latency_s"]
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


def stored_profile(root, method: str, nodes: int, compute_s: list[float]) -> None:
    """A profile with known compute per rank (one segment before each collective, one after)."""
    sk = skeleton("vit-tiny", method, {}, 17, nodes)
    traces = []
    for r in range(nodes):
        events = []
        for c in sk.collectives[r]:
            events += [Compute(compute_s[r]), c]
        traces.append(Trace(r, events + [Compute(compute_s[r])]))
    meta = {"code": code_fingerprint()}
    ProfileStore(root).put(ComputeProfile(ProfileKey.of("vit-tiny", method, {}, 17, nodes), traces, meta=meta))


def test_shared_cores_stretch_the_busy_ranks(tmp_path):
    cal = tmp_path / "cal"
    stored_profile(cal, "sequence_parallel", 4, [0.01] * 4)
    stored_profile(cal, "single", 4, [0.01, 0, 0, 0])
    cfg = dict(calibration_dir=str(cal), measure_missing=False, wire=WireModel())
    alone, shared = Simulator(SimConfig(**cfg)), Simulator(SimConfig(**cfg, shared_cpus=2))
    sp = cell(method="sequence_parallel", nodes=4, repetitions=1)
    a, b = alone.run(**sp)[0], shared.run(**sp)[0]
    assert b["compute_s"] == pytest.approx(2 * a["compute_s"])  # 4 busy ranks on 2 cores
    single = cell(method="single", nodes=4, repetitions=1)
    assert shared.run(**single)[0]["latency_s"] == pytest.approx(alone.run(**single)[0]["latency_s"])
    with pytest.raises(ConfigError):
        SimConfig(shared_cpus=0)


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
    row = sim.run(**cell(repetitions=1))[0]
    assert row["compute_s"] < 5.0 and not store.get(key).stale
