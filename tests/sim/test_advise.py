"""`testbed advise`: the ranking, its error bands, its input parsing and the confirming experiment."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from testbed.errors import ConfigError
from testbed.net.profile import LinkProfile
from testbed.sim.advise import ERROR_BAND_PCT, VALIDATED_REFERENCES, Candidate, candidates, error_band, rank
from testbed.sim.simulator import SimConfig, Simulator

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(model="vit-tiny", tokens=17)
PROFILES = (LinkProfile(5, 1), LinkProfile(500, 1))  # two clearly separated links


@pytest.fixture(scope="module")
def cal(tmp_path_factory):
    return tmp_path_factory.mktemp("advise-cal")


def test_candidates_cover_every_method_and_parameter_the_model_accepts():
    grid = candidates("vit-tiny", 17, [2, 4])  # D=64, 2 blocks, 4 heads
    labels = [c.label for c in grid]
    assert labels[0] == "single" and labels.count("single") == 1
    assert "tensor_parallel N=4" in labels and "block_parallel n_b=2 N=2" in labels
    assert "block_parallel n_b=3 N=2" not in labels  # n_b above the 2 blocks: refused by the method
    astra = [c for c in grid if c.method == "astra" and c.nodes == 2]
    assert {(c.params["groups"], c.params["codebook_size"]) for c in astra} == {
        (g, k) for g in (1, 4, 16, 32) for k in (256, 1024)}  # every G divides D=64
    with pytest.raises(ConfigError):
        candidates("vit-tiny", 17, [1])


def test_error_bands_are_the_committed_validation_figures():
    """ERROR_BAND_PCT restates the p90 |error| per method of the committed validation tables."""
    tables = [pd.read_csv(ROOT / "results" / "reference" / r / "validation" / "validation.csv")
              for r in VALIDATED_REFERENCES]
    t = pd.concat(tables)
    for method, grp in t.groupby("method"):
        assert ERROR_BAND_PCT[method] == pytest.approx(round(grp["abs_error_pct"].quantile(0.9), 1), abs=0.05)
    assert ERROR_BAND_PCT["*"] == pytest.approx(round(t["abs_error_pct"].quantile(0.9), 1), abs=0.05)
    assert error_band("no-such-method") == ERROR_BAND_PCT["*"]


def sim_backend_latencies(cands: list[Candidate], profile: LinkProfile, cal: Path, tmp: Path) -> list[float]:
    """The same cases run as an experiment on `backend: sim` (the runner's own path), median latency each."""
    from testbed.experiment.cli import run_main

    exp = {"name": "advise-check", "model": {"name": "vit-tiny"}, "input": {"tokens": 17},
           "methods": [{"name": c.method, "params": c.params, "label": c.label} for c in cands],
           "nodes": {"count": 2}, "topology": "star",
           "sweep": {"bandwidth_mbps": [profile.bandwidth_mbps], "delay_ms": [profile.delay_ms]},
           "repetitions": 1, "warmup": 0, "backend": "sim"}
    f = tmp / f"e{profile.bandwidth_mbps:g}.yaml"
    f.write_text(yaml.safe_dump(exp))
    out = tmp / f"run{profile.bandwidth_mbps:g}"
    assert run_main([str(f), "--out", str(out), "--calibration", str(cal), "--calibration-repetitions", "1",
                     "--no-plots", "--quiet"]) == 0
    rows = pd.read_csv(out / "rows.csv")
    return [float(rows[rows["label"] == c.label]["latency_s"].median()) for c in cands]


@pytest.mark.parametrize("profile", PROFILES, ids=["5mbit", "500mbit"])
def test_ranking_is_the_sim_backends_own_order(profile, cal, tmp_path):
    sim = Simulator(SimConfig(calibration_dir=str(cal), calibration_repetitions=1))
    ranked, skipped = rank(sim, "vit-tiny", 17, "star", profile, nodes=[2])
    assert not skipped and len(ranked) == len(candidates("vit-tiny", 17, [2]))
    lat = [r.latency_s for r in ranked]
    assert lat == sorted(lat)
    measured = sim_backend_latencies([r.candidate for r in ranked], profile, cal, tmp_path)
    assert measured == pytest.approx(lat, rel=1e-9)  # same model, same calibration: same numbers, same order
    for r in ranked:
        assert r.low_s < r.latency_s < r.high_s and math.isfinite(r.band_pct)


def test_the_link_decides_the_order(cal):
    """At 5 Mbit/s tensor parallel (two all-reduces of the full activations per block, the most bytes)
    is the slowest candidate; 100x the bandwidth shrinks its latency the most."""
    sim = Simulator(SimConfig(calibration_dir=str(cal), calibration_repetitions=1))
    slow, _ = rank(sim, "vit-tiny", 17, "star", PROFILES[0], nodes=[2])
    fast, _ = rank(sim, "vit-tiny", 17, "star", PROFILES[1], nodes=[2])
    assert slow[-1].candidate.method == "tensor_parallel"
    gain = {r.candidate.label: r.latency_s for r in slow}
    for r in fast:
        gain[r.candidate.label] /= r.latency_s
    assert max(gain, key=gain.get) == "tensor_parallel N=2" and gain["single"] == pytest.approx(1.0)


def test_without_calibration_every_candidate_is_reported_not_guessed():
    sim = Simulator(SimConfig(calibration_dir="/nonexistent", measure_missing=False))
    ranked, skipped = rank(sim, "vit-tiny", 17, "star", PROFILES[0], nodes=[2])
    assert not ranked and len(skipped) == len(candidates("vit-tiny", 17, [2]))
    assert all(why for _, why in skipped)


def test_link_device_and_fidelity_parsing(tmp_path):
    from testbed.experiment.advise import link_from_fidelity, parse_device, parse_link

    assert parse_link("20/5") == LinkProfile(20, 5)
    assert parse_link("100/1/0.5") == LinkProfile(100, 1, 0, 0.5)
    assert parse_link("none/2") == LinkProfile(None, 2)
    for bad in ("", "fast", "20/-1", "0/1", "20/1/100", "1/2/3/4"):
        with pytest.raises(ConfigError):
            parse_link(bad)
    assert parse_device("host") == (1.0, 1) and parse_device("0.5") == (0.5, 1)
    assert parse_device("speed=0.25,threads=2") == (0.25, 2)
    for bad in ("fast", "speed=0", "cores=2", "speed=1,threads=0"):
        with pytest.raises(ConfigError):
            parse_device(bad)
    # a fidelity table: its worst path, goodput turned back into the wire rate (payload 1448 of 1514 bytes)
    (tmp_path / "fidelity.csv").write_text(
        "src,dst,goodput_mbps,rtt_ms,ping_loss_pct\nh1,h2,95.6,2.2,0\nh1,h3,47.8,4.0,1.0\n")
    prof, note = link_from_fidelity(tmp_path / "fidelity.csv")
    assert prof.bandwidth_mbps == pytest.approx(47.8 * 1514 / 1448)
    assert (prof.delay_ms, prof.loss_pct) == (2.0, 1.0) and "2 measured path(s)" in note
    prof, _ = link_from_fidelity(ROOT / "results" / "reference" / "quickstart" / "manifest.json")
    assert prof.bandwidth_mbps == pytest.approx(19.124659994705627 * 1514 / 1448)  # its 20 Mbit/s cell
    with pytest.raises(ConfigError):
        link_from_fidelity(tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text("src,dst\nh1,h2\n")
    with pytest.raises(ConfigError):
        link_from_fidelity(tmp_path / "empty.csv")


def test_advise_prints_the_table_and_confirm_writes_a_runnable_experiment(cal, tmp_path, capsys):
    from testbed.cli import main

    out = tmp_path / "confirm"
    assert main(["advise", "--model", "vit-tiny", "--tokens", "17", "--device", "host", "--link", "5/1",
                 "--nodes", "2", "--top", "3", "--confirm", "--no-run", "--out", str(out),
                 "--calibration", str(cal)]) == 0
    text = capsys.readouterr().out
    assert "latency_s" in text and "band" in text and "single" in text
    files = sorted(out.glob("*.yaml"))
    assert len(files) == 1
    from testbed.experiment.spec import load_spec

    spec = load_spec(files[0])
    assert len(spec.methods) == 3 and spec.backend == "mininet" and spec.nodes.count == 2
    assert f"testbed run {files[0]}" in text


@pytest.mark.parametrize("argv, field", [
    (["--model", "nope", "--tokens", "17", "--device", "host", "--link", "5"], "--model"),
    (["--model", "vit-tiny", "--tokens", "17", "--device", "x", "--link", "5"], "--device"),
    (["--model", "vit-tiny", "--tokens", "17", "--device", "host", "--link", "5/x"], "--link"),
    (["--model", "vit-tiny", "--tokens", "17", "--device", "host", "--link", "5", "--nodes", "1"], "--nodes"),
    (["--model", "vit-tiny", "--tokens", "17", "--topology", "nope-topology", "--link", "5"], "topology"),
])
def test_bad_input_is_one_line(argv, field, capsys):
    from testbed.cli import main

    assert main(["advise", *argv, "--no-measure", "--calibration", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("testbed advise: error: ") and field in err, err
