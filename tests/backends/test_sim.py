"""The sim backend: the runner's interface over the simulator, one InferenceResult per inference."""

from __future__ import annotations

import json
import math

import pytest

from testbed.backends import BACKENDS, backend_class
from testbed.backends.base import Backend, BackendSetup
from testbed.backends.sim import SimBackend, rank_speeds, sim_config
from testbed.errors import ConfigError
from testbed.experiment.metrics import output_columns, timing_columns
from testbed.methods.job import JobSpec
from testbed.net.profile import LinkProfile
from testbed.net.replay import BandwidthTrace
from testbed.net.topology import DeviceProfile
from testbed.sim.network import WireModel
from testbed.sim.simulator import SimConfig, Simulator


@pytest.fixture
def sim(tmp_path):
    return Simulator(SimConfig(calibration_dir=str(tmp_path / "cal"), calibration_repetitions=1,
                               calibration_warmup=0, wire=WireModel()))


def test_one_registry_of_backends_with_the_interface():
    assert list(BACKENDS) == ["inprocess", "loopback", "mininet", "sim", "devices"]
    for name in ("inprocess", "loopback", "sim", "devices"):
        assert issubclass(backend_class(name), Backend) and backend_class(name).name == name
    with pytest.raises(ConfigError) as e:
        backend_class("docker")
    assert e.value.allowed == "inprocess | loopback | mininet | sim | devices"


def test_inference_aggregates_as_measured_rows_do(sim, tmp_path):
    backend = SimBackend(sim, "star", [1.0, 1.0], run_dir=tmp_path / "run")
    backend.start(2)
    backend.apply_profile(LinkProfile(10, 5))
    assert backend.mechanism == "sim"
    backend.load(JobSpec("vit-tiny", "sequence_parallel", 2, 17))
    assert backend.mechanism == "sim/measured"
    w0 = backend.wire_bytes()
    res = backend.infer(0)
    want = sim.results(model="vit-tiny", method="sequence_parallel", params={}, tokens=17, nodes=2, topology="star",
                       profile=LinkProfile(10, 5))[0]
    cols = timing_columns(res.latency_s, res.nodes)
    busy = [s for s in want.ranks if s.finish_s >= 0.01 * want.critical.finish_s]
    assert cols == {
        "latency_s": want.latency_s, "compute_s": want.critical.compute_s, "comm_s": want.critical.comm_s,
        "wait_s": want.critical.wait_s, "serialize_s": want.critical.serialize_s, "critical_rank": want.critical.rank,
        "compute_s_mean": sum(s.compute_s for s in busy) / len(busy),
        "comm_s_mean": sum(s.comm_s for s in busy) / len(busy),
        "bytes_sent": want.bytes_sent, "bytes_sent_max_rank": max(s.bytes_sent for s in want.ranks)}
    assert backend.wire_bytes() - w0 == want.bytes_on_wire > want.bytes_sent
    assert res.output is None and math.isnan(output_columns(res.output, None)["agreement"])
    backend.close()
    record = json.loads((tmp_path / "run" / "sim.json").read_text())
    assert record["tcp"]["mode"] == "slow_start" and "per_message_s" in record["wire"]
    assert len(record["profiles"]) == 1 and not record["profiles"][0]["extrapolated"]


def test_a_job_the_simulator_cannot_run_fails_at_load(sim):
    backend = SimBackend(sim, "star", [1.0] * 3)
    backend.start(3)
    with pytest.raises(ConfigError) as e:
        backend.load(JobSpec("vit-tiny", "tensor_parallel", 3, 17))
    assert "world_size" in str(e.value) and backend.mechanism == "sim"
    with pytest.raises(ConfigError):
        backend.infer(0)
    with pytest.raises(ConfigError) as e:
        backend.replay(BandwidthTrace.from_points([(0, 10), (1, 20)]))
    assert e.value.field == "sweep.traces" and "not sim" in e.value.allowed


def test_settings_and_speeds():
    c = sim_config({"tcp": "steady", "loss_mode": "expected", "no_overhead": True, "per_message_s": 1e-4,
                    "measure": False, "shared_cpus": 2})
    assert (c.tcp.mode, c.tcp.loss_mode, c.measure_missing, c.shared_cpus) == ("steady", "expected", False, 2)
    assert c.wire.per_message_s == 1e-4 and c.wire.message_header_bytes == 0
    assert sim_config({}).wire is None  # the transport's measured costs
    for bad in ({"tcp": "reno"}, {"colour": 1}):
        with pytest.raises(ConfigError):
            sim_config(bad)
    devices = [DeviceProfile(speed=0.5), DeviceProfile(speed=1.0)]
    assert rank_speeds(devices, 2, None) == [2.0, 1.0]
    assert rank_speeds(devices, 2, [3.0]) == [3.0, 3.0]
    with pytest.raises(ConfigError):
        rank_speeds(devices, 2, [1.0, 2.0, 3.0])
    setup = BackendSetup(nodes=2, topology_source="star", devices=devices, settings={"measure": False})
    backend = SimBackend.from_setup(setup)
    assert backend.topology == "star" and backend.speeds == [2.0, 1.0] and not backend.sim.config.measure_missing


def test_the_first_inference_after_a_load_runs_on_cold_connections(sim):
    """A node opens new peer channels per job: the first inference after load() pays slow start where
    the BDP exceeds the initial window (100 Mbit/s, 25 ms: ~400 segments), the next ones keep the
    windows (as measured repetitions after the runner's warm-up do)."""
    backend = SimBackend(sim, "star", [1.0, 1.0])
    backend.start(2)
    backend.apply_profile(LinkProfile(100, 25))
    backend.load(JobSpec("vit-small", "sequence_parallel", 2, 65))  # 50 KB all-gathers: 35 segments
    first, second, third = (backend.infer(r).latency_s for r in (None, 0, 1))
    kw = dict(model="vit-small", method="sequence_parallel", params={}, tokens=65, nodes=2, topology="star",
              profile=LinkProfile(100, 25))
    assert first == sim.results(**kw, warm=False)[0].latency_s
    assert second == third == sim.results(**kw, warm=True)[0].latency_s == sim.results(**kw)[0].latency_s
    assert first > second + 0.05  # at least one round trip (50 ms) of slow start
    backend.load(JobSpec("vit-small", "sequence_parallel", 2, 65))  # a new job: new connections
    assert backend.infer(2).latency_s == first
    backend.close()
