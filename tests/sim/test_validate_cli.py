"""`testbed validate RUN_DIR`: every cell predicted from calibration alone, topology and devices read
from the run's manifest (an inline topology with a slow device here), errors per method and overall."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from testbed.cli import main as _testbed

INLINE_SLOW = """
name: inline-slow
model: vit-tiny
input: {tokens: 17}
methods: [single, sequence_parallel, tensor_parallel]
nodes: 2
topology:
  name: pair-slow
  hosts: [{name: h1}, {name: h2, device: {speed: 0.5}}]
  switches: [s1]
  links:
    - {a: h1, b: s1, profile: {bandwidth_mbps: 100, delay_ms: 1}, sweep: half}
    - {a: h2, b: s1, profile: {bandwidth_mbps: 100, delay_ms: 1}, sweep: half}
sweep: {bandwidth_mbps: [20, 200], delay_ms: [1]}
repetitions: 1
warmup: 0
backend: sim
"""


@pytest.fixture(scope="module")
def slow_run(tmp_path_factory):
    """A sim-backend run of an experiment with an inline topology whose second host is twice as slow."""
    from testbed.experiment.cli import run_main

    d = tmp_path_factory.mktemp("inline-slow")
    (d / "e.yaml").write_text(INLINE_SLOW)
    assert run_main([str(d / "e.yaml"), "--out", str(d / "run"), "--calibration", str(d / "cal"),
                     "--calibration-repetitions", "1", "--no-plots", "--quiet"]) == 0
    return d


def test_validate_reads_the_inline_topology_and_its_devices(slow_run, tmp_path, capsys):
    from testbed.experiment.validation import run_speeds, run_topology

    assert run_topology(slow_run / "run").name == "pair-slow"
    assert run_speeds(slow_run / "run") == [1.0, 2.0]  # h2 at speed 0.5 computes twice as long
    out = tmp_path / "v"
    assert _testbed(["validate", str(slow_run / "run"), "--calibration", str(slow_run / "cal"),
                         "--out", str(out), "--no-measure"]) == 0
    text = capsys.readouterr().out
    table = pd.read_csv(out / "validation.csv")
    assert len(table) == 3 * 2 and (table["sim_status"] == "ok").all()
    # the simulator predicting its own run: it is only exact if the slow device and the inline
    # topology were read back from the manifest
    assert table["abs_error_pct"].max() == pytest.approx(0.0, abs=1e-6)
    assert (out / "validation.png").stat().st_size > 0
    for label in ("single", "sequence_parallel", "tensor_parallel", "overall"):
        assert label in text
    assert "median_error_pct" in text and "median_abs_error_pct" in text and "p90_abs_error_pct" in text
    assert "compute_cpu_ratio" in text


def test_validate_without_the_slow_device_sees_the_error(slow_run, tmp_path):
    """The same run with the device speed removed from its manifest: ranks on h2 are predicted twice
    as fast as they ran, so the cells where h2 computes are predicted too low."""
    run = tmp_path / "run"
    shutil.copytree(slow_run / "run", run)
    m = json.loads((run / "manifest.json").read_text())
    m["config"]["topology"]["hosts"] = [{"name": "h1"}, {"name": "h2"}]
    (run / "manifest.json").write_text(json.dumps(m))
    assert _testbed(["validate", str(run), "--calibration", str(slow_run / "cal"), "--no-measure",
                         "--quiet"]) == 0
    table = pd.read_csv(run / "validation" / "validation.csv")
    sp = table[table["method"] == "sequence_parallel"]
    assert (sp["error_pct"] < -1).all()  # predicted faster than measured
    single = table[table["method"] == "single"]  # rank 0 (h1) computes alone: unchanged
    assert single["abs_error_pct"].max() == pytest.approx(0.0, abs=1e-6)


def test_validate_bad_input_is_one_line(tmp_path, capsys):
    assert _testbed(["validate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("testbed validate: error: ")


def test_validate_a_run_whose_rows_all_failed_says_so_in_one_line(slow_run, tmp_path, capsys):
    run = tmp_path / "failed"
    shutil.copytree(slow_run / "run", run)
    rows = pd.read_csv(run / "rows.csv")
    rows["status"], rows["error"] = "error", "load: the node died"
    rows.to_csv(run / "rows.csv", index=False)
    assert _testbed(["validate", str(run), "--out", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a run with ok rows to predict" in err and "the node died" in err
    assert not (tmp_path / "v").exists()  # nothing half-written
