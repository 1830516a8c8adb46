"""Comparison table and plot of simulated vs emulated rows."""

from __future__ import annotations

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
    csv, png = save_validation(slow, tmp_path / "v")
    assert csv.is_file() and png.stat().st_size > 0
    assert len(pd.read_csv(csv)) == 4


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
