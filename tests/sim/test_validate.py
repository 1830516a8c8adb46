"""Comparison table and plot of simulated vs emulated rows."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from testbed.errors import ConfigError
from testbed.net.profile import LinkProfile
from testbed.sim.network import WireModel
from testbed.sim.profiles import ProfileKey
from testbed.sim.simulator import SimConfig, Simulator
from testbed.sim.validate import compare, save_validation, summary


@pytest.fixture
def sim(tmp_path):
    return Simulator(SimConfig(calibration_dir=str(tmp_path / "cal"), calibration_repetitions=1,
                               calibration_warmup=0, wire=WireModel()))


def fake_emulated(sim: Simulator, scale: float) -> pd.DataFrame:
    """Rows as a run would record them, with latencies ``scale`` times the simulator's own."""
    rows = []
    for method in ("sequence_parallel", "astra"):
        params = {"groups": 2, "codebook_size": 16} if method == "astra" else {}
        for bw in (10, 100):
            p = LinkProfile(bw, 2)
            results = sim.results(model="vit-tiny", method=method, params=params, tokens=17, nodes=2,
                                  topology="star", profile=p, repetitions=3)
            for rep, res in enumerate(results):
                rows.append({"experiment": "q", "model": "vit-tiny", "method": method,
                             "method_params": ProfileKey.of("vit-tiny", method, params, 17, 2).params_json,
                             "label": method, "tokens": 17, "batch": 1, "nodes": 2, "topology": "star",
                             "bandwidth_mbps": p.bandwidth_mbps, "delay_ms": p.delay_ms, "jitter_ms": p.jitter_ms,
                             "loss_pct": p.loss_pct, "trace": "", "repetition": rep, "latency_s": res.latency_s,
                             "comm_s": res.critical.comm_s, "bytes_on_wire": res.bytes_on_wire, "status": "ok"})
    df = pd.DataFrame(rows)
    df["latency_s"] *= scale
    df["backend"] = "mininet"
    return df


def test_compare_against_itself_and_a_known_offset(sim, tmp_path):
    same = compare(fake_emulated(sim, 1.0), sim)
    assert len(same) == 4 and (same["sim_status"] == "ok").all()
    assert same["abs_error_pct"].max() == pytest.approx(0.0, abs=1e-9)
    slow = compare(fake_emulated(sim, 1.25), sim)  # emulation 25% slower than predicted
    assert slow["error_pct"].to_list() == pytest.approx([-20.0] * 4)
    assert summary(slow)["median_abs_error_pct"] == pytest.approx(20.0)
    assert summary(slow)["median_error_pct"] == pytest.approx(-20.0)  # the bias keeps its sign
    csv, png = save_validation(slow, tmp_path / "v")
    assert csv.is_file() and png.stat().st_size > 0
    assert len(pd.read_csv(csv)) == 4


def test_cells_are_predicted_at_the_hosts_speed_when_the_run_measured(sim):
    rows = fake_emulated(sim, 1.0)
    probes = [sim.profile(ProfileKey.of("vit-tiny", m, p, 17, 2)).meta["host_probe_s"]
              for m, p in (("sequence_parallel", {}), ("astra", {"groups": 2, "codebook_size": 16}))]
    assert min(probes) > 0  # measured profiles record the host's speed
    rows["host_probe_s"] = 1.5 * sum(probes) / 2  # the host was 1.5x slower when these ran (median of two)
    rows.loc[0, "host_probe_s"] = 100.0  # one unit's probe far off: medians are not moved by it
    # two cells on one profile, one on the other: each profile's probe counts once
    rows = rows[~((rows["method"] == "astra") & (rows["bandwidth_mbps"] == 100))].reset_index(drop=True)
    slower = compare(rows, sim)
    assert slower["host_scale"].to_list() == pytest.approx([1.5] * 3)
    assert (slower["predicted_latency_s"] > slower["measured_latency_s"]).all()  # compute x 1.5, the links not
    as_calibrated = compare(rows, sim, host_speed=False)
    assert as_calibrated["host_scale"].isna().all() and as_calibrated["abs_error_pct"].max() == pytest.approx(0, abs=1e-9)
    rows["host_probe_s"] = float("nan")  # rows made before the probe existed: nothing to carry over
    assert compare(rows, sim)["abs_error_pct"].max() == pytest.approx(0, abs=1e-9)


def test_replaying_the_runs_own_traces(sim):
    emulated = fake_emulated(sim, 1.0)
    key = ProfileKey.of("vit-tiny", "sequence_parallel", {}, 17, 2)
    ranks = [t.to_dict() for t in sim.profile(key).traces]
    traces = [{"method": "sequence_parallel", "method_params": "{}", "bandwidth_mbps": 10.0, "delay_ms": 2.0,
               "jitter_ms": 0.0, "loss_pct": 0.0, "ranks": ranks}]
    table = compare(emulated, sim, traces=traces)
    row = table[(table["method"] == "sequence_parallel") & (table["bandwidth_mbps"] == 10)].iloc[0]
    assert row["replayed_latency_s"] == pytest.approx(row["predicted_latency_s"], rel=1e-12)
    assert table["replayed_latency_s"].isna().sum() == 3  # no traces for the other cells


def test_failed_and_missing_columns(sim):
    df = fake_emulated(sim, 1.0)
    df.loc[df.index[:3], "status"] = "error"  # a whole cell failed in emulation: not compared
    assert len(compare(df, sim)) == 3
    with pytest.raises(ConfigError):
        compare(df.drop(columns=["latency_s"]), sim)


INLINE = """
name: inline-topology
model: vit-tiny
input: {tokens: 17}
methods: [single, sequence_parallel]
nodes: 2
topology:
  name: pair
  hosts: [h1, h2]
  switches: [s1]
  links:
    - {a: h1, b: s1, profile: {bandwidth_mbps: 100, delay_ms: 1}, sweep: half}
    - {a: h2, b: s1, profile: {bandwidth_mbps: 100, delay_ms: 1}, sweep: half}
sweep: {bandwidth_mbps: [20], delay_ms: [0, 10]}
repetitions: 1
warmup: 0
backend: sim
"""


@pytest.fixture(scope="module")
def inline_run(tmp_path_factory):
    """A sim-backend run directory of an experiment whose topology is given inline (not in topologies/)."""
    from testbed.experiment.cli import run_main

    d = tmp_path_factory.mktemp("inline")
    (d / "e.yaml").write_text(INLINE)
    assert run_main([str(d / "e.yaml"), "--out", str(d / "run"), "--calibration", str(d / "cal"),
                     "--calibration-repetitions", "1", "--no-plots", "--quiet"]) == 0
    return d


def test_a_run_with_an_inline_topology_is_validated_on_that_topology(inline_run):
    from testbed.experiment.validation import run_topology, validate_run

    topo = run_topology(inline_run / "run")
    assert topo.name == "pair" and [h.name for h in topo.hosts] == ["h1", "h2"]
    sim = Simulator(SimConfig(calibration_dir=str(inline_run / "cal"), calibration_repetitions=1))
    table, paths = validate_run(inline_run / "run", sim)
    assert len(table) == 2 * 2 and (table["sim_status"] == "ok").all(), table["sim_error"].tolist()
    # the simulator predicting its own run: the same cells, the same numbers
    assert table["abs_error_pct"].max() == pytest.approx(0.0, abs=1e-6)
    assert {p.name for p in paths} == {"validation.csv", "validation.png"}


def test_bench_validates_an_inline_run_and_refuses_a_bad_dir_in_one_line(inline_run, tmp_path, capsys):
    from testbed.bench.sim import main

    assert main(["--skip-scale", "--emulation", "none", "--calibration", str(inline_run / "cal"),
                 "--emulated", str(inline_run / "run")]) == 0
    assert "4/4 cells predicted; median |error| 0.0%" in capsys.readouterr().out
    assert main(["--skip-scale", "--calibration", str(inline_run / "cal"), "--emulated", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m testbed.bench.sim: error: run_dir: got ")
    shutil.copytree(inline_run / "run", tmp_path / "run")
    rows = pd.read_csv(tmp_path / "run" / "rows.csv")
    rows.loc[rows["method"] == "single", "nodes"] = 3  # more nodes than the topology has hosts
    rows.to_csv(tmp_path / "run" / "rows.csv", index=False)
    assert main(["--skip-scale", "--emulation", "none", "--calibration", str(inline_run / "cal"),
                 "--emulated", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "2/4 cells predicted" in out
    assert "[fidelity] 2 cell(s) not predicted: nodes: got 3; allowed: 1..2 (the hosts of topology 'pair')" in out


def test_the_runs_topology_comes_from_its_manifest(tmp_path):
    from testbed.experiment.validation import run_topology

    with pytest.raises(ConfigError, match="manifest.json"):
        run_topology(tmp_path)  # no manifest
    config = {"name": "k", "model": {"name": "vit-tiny"}, "input": {"tokens": 17}, "methods": ["single"],
              "nodes": {"count": 3}, "topology": "star"}
    (tmp_path / "manifest.json").write_text(json.dumps({"config": config}))
    assert run_topology(tmp_path) == "star"  # a kind: the simulator scales it to the run's nodes
    topo_file = tmp_path / "three.yaml"
    topo_file.write_text("name: three\nhosts: [a, b, c]\nswitches: [s]\nlinks:\n"
                         + "".join(f"  - {{a: {h}, b: s, profile: {{bandwidth_mbps: 10}}}}\n" for h in "abc"))
    (tmp_path / "manifest.json").write_text(json.dumps({"config": {**config, "topology": str(topo_file)}}))
    assert [h.name for h in run_topology(tmp_path).hosts] == ["a", "b", "c"]
    topo_file.unlink()  # moved since the run: one error naming where the topology was read from
    with pytest.raises(ConfigError, match=r"manifest.json config \(topology\)"):
        run_topology(tmp_path)


def test_compute_cpu_ratio_is_the_runs_segment_cpu_over_the_calibrated():
    """Closed form: every segment of every rank and repetition took 1.25x its calibrated CPU -> 1.25;
    segments under JITTER_MIN_SEGMENT_S are left out; traces without cpu_s or of another schedule -> NaN."""
    import math

    from testbed.comm.trace import Collective, Compute, Trace
    from testbed.sim.emulation import JITTER_MIN_SEGMENT_S
    from testbed.sim.validate import compute_cpu_ratio

    short = JITTER_MIN_SEGMENT_S / 2
    calibrated = [Trace(r, [Compute(0.02), Collective("all_gather"), Compute(0.04), Collective("all_gather"),
                            Compute(short)]) for r in range(2)]

    def run(scale: float, short_cpu: float = 1.0, cpu: bool = True) -> list[dict]:
        ranks = []
        for t in calibrated:
            events = [Compute(e.duration_s * 2, cpu_s=(e.duration_s * (scale if e.duration_s > short else short_cpu))
                              if cpu else None) if isinstance(e, Compute) else e for e in t.events]
            ranks.append(Trace(t.rank, events).to_dict())
        return ranks

    assert compute_cpu_ratio([run(1.25, short_cpu=50.0), run(1.25)], calibrated) == pytest.approx(1.25)
    assert math.isnan(compute_cpu_ratio([run(1.25, cpu=False)], calibrated))  # made before traces carried it
    other = [dict(r, events=r["events"][:2]) for r in run(1.25)]
    assert math.isnan(compute_cpu_ratio([other], calibrated))  # another schedule: nothing to align
