"""How an emulated run computed (dilation, throttling, contention), CPU-time calibration and
per-node device speeds in the simulator: each term checked in closed form."""

from __future__ import annotations

import time

import pytest

from testbed.comm.trace import Trace
from testbed.errors import ConfigError
from testbed.net.profile import LinkProfile
from testbed.sim.emulation import THROTTLE_OVERHEAD, EmulationModel, throttle_overhead
from testbed.sim.network import WireModel
from testbed.sim.simulator import SimConfig, Simulator

from tests.sim.test_simulator import cell, stored_profile


def test_throttle_overhead_is_the_measured_table_interpolated():
    assert throttle_overhead(10) == THROTTLE_OVERHEAD[10.0] == 1.18
    assert throttle_overhead(25) == 1.05 and throttle_overhead(100) == 1.0
    assert throttle_overhead(17.5) == pytest.approx((1.18 + 1.05) / 2)  # halfway between 10 and 25 ms
    assert throttle_overhead(62.5) == pytest.approx((1.05 + 1.0) / 2)
    assert throttle_overhead(2) == 1.18 and throttle_overhead(500) == 1.0  # nearest measured value
    for bad in (0, -1, "10", True):
        with pytest.raises(ConfigError):
            throttle_overhead(bad)


def dilated_manifest(factor=2.67, slice_ms=10.0, oversubscribed=False, cpus=2, paced=False) -> dict:
    return {"backend": {"name": "mininet"}, "machine": {"cpu_count": cpus},
            "config": {"emulation": {"time_dilation": "auto", "cpu_slice_ms": slice_ms, "pace_compute": paced}},
            "time_dilation": {"factor": factor, "oversubscribed": oversubscribed}}


def test_the_manifest_says_how_the_devices_computed():
    d = EmulationModel.of_manifest(dilated_manifest())
    assert (d.shared_cpus, d.compute_scale, d.time_dilation) == (None, 1.18, 2.67)  # whole devices, throttled
    assert d.burst_bound_s == pytest.approx(0.010 * (1 - 1 / 2.67))  # one slice at host speed
    assert EmulationModel.of_manifest(dilated_manifest(slice_ms=25)).compute_scale == 1.05
    # an undilated run (no dilation record: made before dilation existed) shared the machine's cores
    u = EmulationModel.of_manifest({"backend": {"name": "mininet"}, "machine": {"cpu_count": 2}, "config": {}})
    assert (u.shared_cpus, u.compute_scale, u.burst_bound_s) == (2, 1.0, 0.0)
    assert EmulationModel.of_manifest(dilated_manifest(factor=1.0)).shared_cpus == 2
    over = EmulationModel.of_manifest(dilated_manifest(oversubscribed=True))  # quotas did not fit: contention
    assert (over.shared_cpus, over.compute_scale) == (2, 1.0)
    sim_run = EmulationModel.of_manifest({"backend": {"name": "sim"}, "machine": {"cpu_count": 2}})
    assert (sim_run.shared_cpus, sim_run.compute_scale) == (None, 1.0)
    # what an emulated inference costs outside the ranks' traces: dilated, undilated, nothing simulated
    from testbed.sim.emulation import DILATED_DISPATCH_S, UNDILATED_DISPATCH_S

    assert (d.dispatch_s, u.dispatch_s, over.dispatch_s, sim_run.dispatch_s) == (
        DILATED_DISPATCH_S, UNDILATED_DISPATCH_S, UNDILATED_DISPATCH_S, 0.0)


def test_dispatch_is_latency_less_the_longest_traced_rank_and_the_simulator_adds_it(tmp_path):
    import pandas as pd

    from testbed.sim.emulation import dispatch_overhead_s

    def trace(cell, rep, *ranks):
        return {"cell": cell, "repetition": rep, "ranks": [
            {"rank": r, "events": [{"type": "compute", "duration_s": d} for d in segs]} for r, segs in enumerate(ranks)]}

    rows = pd.DataFrame({"cell": ["a", "a", "b"], "repetition": [0, 1, 0], "latency_s": [0.50, 0.52, 0.30],
                         "status": ["ok", "ok", "ok"]})
    traces = [trace("a", 0, [0.2, 0.28], [0.1]), trace("a", 1, [0.5]), trace("b", 0, [0.1], [0.27]),
              trace("c", 0, [9.0])]  # a trace without its row is left out
    assert dispatch_overhead_s(rows, traces) == pytest.approx(0.02)  # median of 0.02, 0.02, 0.03
    with pytest.raises(ConfigError):
        dispatch_overhead_s(rows, [trace("c", 0, [1.0])])
    # the committed references: the constants are what the function measures on them
    from pathlib import Path

    from testbed.experiment.store import read_rows, read_traces
    from testbed.sim.emulation import DILATED_DISPATCH_S, UNDILATED_DISPATCH_S

    ref = Path(__file__).resolve().parents[2] / "results" / "reference"
    for run, const in (("quickstart", DILATED_DISPATCH_S), ("undilated/quickstart", UNDILATED_DISPATCH_S)):
        assert dispatch_overhead_s(read_rows(ref / run), read_traces(ref / run)) == pytest.approx(const, abs=5e-5)
    # the simulator adds it to every inference and nothing else
    cal = tmp_path / "cal"
    stored_profile(cal, "sequence_parallel", 2, [0.01, 0.02])
    base = dict(calibration_dir=str(cal), measure_missing=False, wire=WireModel())
    c = cell(repetitions=2)
    plain, dispatched = Simulator(SimConfig(**base)).results(**c), Simulator(SimConfig(**base, dispatch_s=0.015)).results(**c)
    for a, b in zip(plain, dispatched):
        assert b.latency_s == pytest.approx(a.latency_s + 0.015)
        assert [x.compute_s for x in b.ranks] == [x.compute_s for x in a.ranks]
    with pytest.raises(ConfigError):
        SimConfig(dispatch_s=-0.001)


def test_compute_scale_multiplies_every_compute_segment(tmp_path):
    cal = tmp_path / "cal"
    stored_profile(cal, "sequence_parallel", 2, [0.01, 0.02])
    base = dict(calibration_dir=str(cal), measure_missing=False, wire=WireModel())
    plain, scaled = Simulator(SimConfig(**base)), Simulator(SimConfig(**base, compute_scale=1.18))
    c = cell(repetitions=1)
    a, b = plain.results(**c)[0], scaled.results(**c)[0]
    for ra, rb in zip(a.ranks, b.ranks):
        assert rb.compute_s == pytest.approx(1.18 * ra.compute_s)
    # the stored profile holds 0.02 s per segment on rank 1 (one segment per collective, one after)
    n_seg = len(plain.profile(plain.store.all()[0].key).traces[1].events) // 2 + 1
    assert b.ranks[1].compute_s == pytest.approx(1.18 * 0.02 * n_seg)
    with pytest.raises(ConfigError):
        SimConfig(compute_scale=0)


def test_a_node_twice_as_slow_computes_twice_as_long(tmp_path):
    cal = tmp_path / "cal"
    stored_profile(cal, "sequence_parallel", 2, [0.01, 0.01])
    sim = Simulator(SimConfig(calibration_dir=str(cal), measure_missing=False, wire=WireModel()))
    c = cell(repetitions=1, profile=LinkProfile(1000, 0))
    even = sim.results(**c)[0]
    slow = sim.results(**c, speed=[1.0, 2.0])[0]  # rank 1's device at half this host's speed
    assert slow.ranks[0].compute_s == pytest.approx(even.ranks[0].compute_s)
    assert slow.ranks[1].compute_s == pytest.approx(2 * even.ranks[1].compute_s)
    assert slow.latency_s > even.latency_s


def test_device_speeds_of_a_topology_reach_the_simulated_ranks(tmp_path):
    """The sim backend takes each rank's speed from the topology's device profiles."""
    from testbed.backends.sim import rank_speeds
    from testbed.net.topology import DeviceProfile

    assert rank_speeds([DeviceProfile(speed=0.5), DeviceProfile(speed=1.0)], 2, None) == [2.0, 1.0]
    assert rank_speeds([DeviceProfile(speed=0.25)], 3, [1.5]) == [1.5, 1.5, 1.5]


def test_a_trace_can_time_compute_in_cpu_seconds():
    ticks = iter([1.0, 3.5, 4.0, 10.0])  # a fake CPU clock: start, segment end, after the call, finish

    tr = Trace(0, clock=lambda: next(ticks))
    tr.start()
    wall = tr.close_compute()
    assert tr.events[0].duration_s == pytest.approx(2.5)  # CPU seconds of the segment
    assert abs(wall - time.perf_counter()) < 1.0  # the collective's own timing stays wall-clock

    from testbed.comm.trace import Collective

    tr.add(Collective("send"))
    tr.finish()
    assert tr.events[-1].duration_s == pytest.approx(6.0)
    assert "clock" not in tr.to_dict()


def test_profiles_timed_with_another_clock_are_stale(tmp_path):
    from testbed.sim.calibrate import CLOCK
    from testbed.sim.profiles import ComputeProfile, ProfileKey, code_fingerprint

    key = ProfileKey.of("vit-tiny", "single", {}, 17, 1)
    fresh = ComputeProfile(key, [Trace(0)], meta={"code": code_fingerprint(), "clock": CLOCK})
    wall = ComputeProfile(key, [Trace(0)], meta={"code": code_fingerprint()})  # wall clock: host load included
    assert not fresh.stale and wall.stale
    assert not ComputeProfile(key, [Trace(0)], extrapolated=True, meta={"code": code_fingerprint()}).stale


def test_calibration_measures_cpu_seconds(tmp_path):
    sim = Simulator(SimConfig(calibration_dir=str(tmp_path / "cal"), calibration_repetitions=1,
                              calibration_warmup=0, wire=WireModel()))
    from testbed.sim.profiles import ProfileKey

    prof = sim.profile(ProfileKey.of("vit-tiny", "sequence_parallel", {}, 17, 2))
    assert prof.meta["clock"] == "process_time" and not prof.stale
    assert all(c > 0 for c in prof.compute_s)


def test_segment_jitter_k_is_the_median_spread_over_sqrt_length():
    from testbed.sim.emulation import segment_jitter_k

    def run(segs_by_rank):
        return {"method": "sequence_parallel", "ranks": [
            {"rank": r, "events": [{"type": "compute", "duration_s": d} for d in segs]}
            for r, segs in enumerate(segs_by_rank)]}

    # two ranks at d - e and d + e: std (n-1) = e * sqrt(2), mean d
    d, e = 0.04, 0.002
    k = segment_jitter_k([run([[d - e, 0.001], [d + e, 0.001]])])  # the 1 ms segment is left out
    assert k == pytest.approx(e * 2 ** 0.5 / d ** 0.5)
    with pytest.raises(ConfigError):
        segment_jitter_k([run([[0.001], [0.001]])])
    # the committed references: the constants are what the function measures on them
    from pathlib import Path

    from testbed.experiment.store import read_traces
    from testbed.sim.emulation import DILATED_JITTER_K, PACED_JITTER_K, UNDILATED_JITTER_K

    ref = Path(__file__).resolve().parents[2] / "results" / "reference"
    assert segment_jitter_k(read_traces(ref / "quickstart")) == pytest.approx(DILATED_JITTER_K, abs=5e-5)
    assert segment_jitter_k(read_traces(ref / "undilated" / "quickstart")) == pytest.approx(UNDILATED_JITTER_K,
                                                                                          abs=5e-5)
    assert segment_jitter_k(read_traces(ref / "paced" / "quickstart")) == pytest.approx(PACED_JITTER_K, abs=5e-5)


def test_paced_runs_are_predicted_with_their_own_jitter():
    from testbed.sim.emulation import DILATED_JITTER_K, PACED_JITTER_K

    paced, unpaced = (EmulationModel.of_manifest(dilated_manifest(paced=p)) for p in (True, False))
    assert (paced.segment_jitter_k, unpaced.segment_jitter_k) == (PACED_JITTER_K, DILATED_JITTER_K)
    assert PACED_JITTER_K < DILATED_JITTER_K / 2  # held segments end where their CPU time says, not a slice
    assert "compute paced" in paced.why and "not paced" in unpaced.why


def test_jittered_segments_keep_their_mean_and_spread_as_k_sqrt_d():
    import numpy as np

    from testbed.comm.trace import Compute
    from testbed.sim.simulator import jittered

    tr = [Trace(0, [Compute(0.04)] * 200), Trace(1, [Compute(0.01)] * 200)]
    same = jittered(tr, [1.0, 1.0], 0.0, seed=3)
    assert [e.duration_s for e in same[0].events] == [0.04] * 200
    f = [1.0, 4.0]  # rank 1's device 4x slower: 0.04 device seconds per segment
    draws = np.array([[e.duration_s * f[i] for e in t.events] for s in range(20)
                      for i, t in enumerate(jittered(tr, f, 0.02, seed=s))]).reshape(20, 2, 200)
    for i in range(2):
        dev = draws[:, i, :].ravel()
        assert dev.mean() == pytest.approx(0.04, rel=0.01)
        assert dev.std() == pytest.approx(0.02 * 0.04 ** 0.5, rel=0.05)
    assert jittered(tr, f, 0.02, seed=1)[0].events[0].duration_s == jittered(tr, f, 0.02, seed=1)[0].events[0].duration_s


def test_jitter_makes_synchronised_ranks_wait_for_the_slowest(tmp_path):
    """Two ranks, all-gather after every segment: each sync adds E[max(z1, z2)] = 1/sqrt(pi) standard
    deviations on average; the rank-wise sums alone (no sync) would add nothing."""
    import math

    import numpy as np

    cal = tmp_path / "cal"
    d = 0.02
    stored_profile(cal, "sequence_parallel", 2, [d, d])
    base = dict(calibration_dir=str(cal), measure_missing=False, wire=WireModel())
    c = cell(repetitions=400, profile=LinkProfile(10_000, 0))
    plain = Simulator(SimConfig(**base)).results(**c)[0].latency_s
    k = 0.02
    lat = np.array([r.latency_s for r in Simulator(SimConfig(**base, segment_jitter_k=k)).results(**c)])
    from testbed.sim.synth import skeleton

    n_segments = len(skeleton("vit-tiny", "sequence_parallel", {}, 17, 2).collectives[0]) + 1
    expected = n_segments * k * math.sqrt(d) / math.sqrt(math.pi)
    assert lat.mean() - plain == pytest.approx(expected, rel=0.15)


def test_a_run_that_measured_its_throttling_is_charged_what_it_measured(tmp_path):
    """The devices' probe under their quotas over the runner's free probe, medians over the run's ok rows,
    replaces the constant for the slice; runs without device probes, and undilated runs, keep theirs."""
    import json

    import pandas as pd

    from testbed.experiment.validation import run_emulation
    from testbed.sim.emulation import measured_throttle

    rows = pd.DataFrame({"status": ["ok", "ok", "ok", "error"], "host_probe_s": [0.010, 0.010, 0.012, 0.001],
                         "device_probe_s": [0.0105, 0.011, 0.5, 0.9]})  # one unit far off; a failed row ignored
    assert measured_throttle(rows) == pytest.approx(0.011 / 0.010)
    assert measured_throttle(rows.drop(columns="device_probe_s")) is None
    assert measured_throttle(rows.assign(device_probe_s=float("nan"))) is None
    d = EmulationModel.of_manifest(dilated_manifest())
    m = EmulationModel.of_manifest(dilated_manifest(), throttle=1.03)
    assert (m.compute_scale, m.time_dilation, m.segment_jitter_k) == (1.03, d.time_dilation, d.segment_jitter_k)
    assert "x 1.030" in m.why and "the constant for 10 ms slices is 1.18" in m.why
    u = EmulationModel.of_manifest(dilated_manifest(factor=1.0))
    assert EmulationModel.of_manifest(dilated_manifest(factor=1.0), throttle=1.5) == u  # nothing throttled these
    with pytest.raises(ConfigError):
        EmulationModel.of_manifest(dilated_manifest(), throttle=0)
    # from a run directory: its manifest and rows
    (tmp_path / "manifest.json").write_text(json.dumps(dilated_manifest()))
    rows.to_csv(tmp_path / "rows.csv", index=False)
    assert run_emulation(tmp_path).compute_scale == pytest.approx(1.1)
    assert run_emulation(tmp_path, device_probe=False).compute_scale == 1.18
