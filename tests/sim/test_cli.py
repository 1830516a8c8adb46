"""`testbed simulate` (the alias of `testbed run --backend sim`) and `testbed calibrate` end to end on a tiny model."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pandas as pd

from testbed.experiment.calibrate import calibrate_main
from testbed.experiment.cli import run_main, simulate_main

EXPERIMENT = """
name: tiny-sim
model: vit-tiny
input: {tokens: 17}
methods: [single, sequence_parallel, {name: astra, params: {groups: 2, codebook_size: 16}}]
nodes: 2
topology: star
sweep: {bandwidth_mbps: [10, 100], delay_ms: [0, 5]}
repetitions: 2
"""
FAST = ["--repetitions", "1"]


def test_simulate_writes_rows_for_every_method_profile_and_repetition(tmp_path):
    exp = tmp_path / "e.yaml"
    exp.write_text(EXPERIMENT)
    out = tmp_path / "out"
    rc = simulate_main([str(exp), "--out", str(out), "--calibration", str(tmp_path / "cal"), "--per-message-s", "1e-4",
                        *FAST])
    assert rc == 0
    df = pd.read_csv(out / "rows.csv")
    assert len(df) == 3 * 4 * 2
    assert set(df["status"]) == {"ok"} and set(df["backend"]) == {"sim"}
    assert df.groupby(["cell", "repetition"]).size().eq(1).all()
    assert (out / "rows.parquet").is_file() and (out / "plots" / "latency.png").is_file()
    meta = json.loads((out / "sim.json").read_text())
    assert meta["tcp"]["mode"] == "slow_start" and len(meta["profiles"]) == 3
    assert meta["wire"]["per_message_s"] == 1e-4
    for p in (tmp_path / "cal").glob("*.json"):  # measured before the sweep, together, repetitions interleaved
        assert "interleaved with 2 other profile" in json.loads(p.read_text())["meta"]["how"]
    # the sweep shows: slower links cost sequence_parallel more than astra
    med = df.groupby(["method", "bandwidth_mbps"])["latency_s"].median()
    assert med["sequence_parallel", 10] > med["sequence_parallel", 100]


def test_simulate_is_run_with_backend_sim(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exp = tmp_path / "e.yaml"
    exp.write_text(EXPERIMENT.replace("repetitions: 2", "repetitions: 1").replace("[10, 100]", "[10]"))
    opts = ["--calibration", str(tmp_path / "cal"), "--per-message-s", "1e-4", "--tcp", "steady", "--quiet"]
    assert simulate_main([str(exp), "--out", str(tmp_path / "a"), "--repetitions", "1", *opts]) == 0
    assert "alias of `testbed run --backend sim`" in capsys.readouterr().err
    assert run_main([str(exp), "--out", str(tmp_path / "b"), "--backend", "sim", "--calibration-repetitions", "1",
                     *opts]) == 0
    a, b = pd.read_csv(tmp_path / "a" / "rows.csv"), pd.read_csv(tmp_path / "b" / "rows.csv")
    cols = ["cell", "repetition", "mechanism", "latency_s", "comm_s", "bytes_sent", "bytes_on_wire"]
    sends = a["bytes_sent"] > 0  # all but single: the modelled wire carries headers and ACKs too
    assert a[cols].equals(b[cols]) and sends.sum() == 4 and (a["bytes_on_wire"] > a["bytes_sent"])[sends].all()
    assert json.loads((tmp_path / "b" / "sim.json").read_text())["tcp"]["mode"] == "steady"
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["backend"]["name"] == "sim"


def test_sim_options_are_refused_by_other_backends(tmp_path, capsys):
    exp = tmp_path / "e.yaml"
    exp.write_text(EXPERIMENT.replace("[10, 100]", "[null]").replace("[0, 5]", "[0]"))
    out = tmp_path / "out"
    assert run_main([str(exp), "--out", str(out), "--backend", "inprocess", "--tcp", "steady"]) == 2
    err = capsys.readouterr().err
    assert "--tcp" in err and "only with backend sim" in err
    assert not out.exists()


def test_simulate_bad_input_writes_nothing(tmp_path, capsys):
    exp = tmp_path / "e.yaml"
    exp.write_text(EXPERIMENT.replace("[10, 100]", "[-10, 100]"))
    out = tmp_path / "out"
    assert simulate_main([str(exp), "--out", str(out)]) == 2
    assert "bandwidth_mbps" in capsys.readouterr().err
    assert not out.exists()


def test_calibrate_measures_small_and_extrapolates_large(tmp_path, capsys):
    cal = tmp_path / "cal"
    args = ["--model", "vit-tiny", "--method", "sequence_parallel", "--nodes", "2", "--calibration", str(cal),
            "--max-measure-tokens", "33", *FAST]
    assert calibrate_main(args + ["--tokens", "17", "33"]) == 0
    assert len(list(cal.glob("*.json"))) == 2
    for p in cal.glob("*.json"):  # measured together, their repetitions interleaved, each with its own probe
        meta = json.loads(p.read_text())["meta"]
        assert "interleaved with 1 other profile" in meta["how"] and meta["host_probe_s"] > 0
    assert calibrate_main(args + ["--tokens", "513"]) == 0
    assert "extrapolated" in capsys.readouterr().out
    stored = [json.loads(p.read_text()) for p in cal.glob("*.json")]
    big = [s for s in stored if s["key"]["tokens"] == 513]
    assert len(big) == 1 and big[0]["extrapolated"] and big[0]["basis"]


def test_calibrate_bad_method_params(tmp_path, capsys):
    assert calibrate_main(["--model", "vit-tiny", "--method", "astra:{groups: 2", "--calibration",
                           str(tmp_path / "cal")]) == 2
    assert "--method" in capsys.readouterr().err
    assert calibrate_main(["--model", "vit-tiny", "--method", "tensor_parallel", "--nodes", "3", "--calibration",
                           str(tmp_path / "cal")]) == 2
    assert not (tmp_path / "cal").exists()


def test_calibrate_transport_only(tmp_path, capsys):
    assert calibrate_main(["--transport", "--calibration", str(tmp_path / "cal")]) == 0
    assert "us per message" in capsys.readouterr().out
    assert (tmp_path / "cal" / "transport" / "grpc.json").is_file()


def test_sim_options_become_the_backends_settings():
    from testbed.experiment.cli import _run_parser, sim_settings

    args = _run_parser().parse_args(["e.yaml", "--no-measure", "--no-overhead", "--speed", "1,2",
                                     "--calibration-repetitions", "2", "--loss-mode", "expected"])
    assert sim_settings(args) == {"measure": False, "no_overhead": True, "speed": [1.0, 2.0],
                                  "calibration_repetitions": 2, "loss_mode": "expected"}
    assert sim_settings(_run_parser().parse_args(["e.yaml"])) == {}  # none given: the backend's defaults


def test_calibrating_an_experiment_keys_profiles_by_the_params_the_run_settles(tmp_path):
    import argparse

    from testbed.experiment.calibrate import _calibration_keys

    exp = tmp_path / "e.yaml"
    # star: ring where the links have no delay (0 ms), direct where they do (5 ms); line: ring throughout
    for topology, want in (("star", ["ring", "direct"]), ("line", ["ring"])):
        exp.write_text(EXPERIMENT.replace("topology: star", f"topology: {topology}").replace(
            "input: {tokens: 17}", "input: {tokens: 1025}").replace("nodes: 2", "nodes: 4").replace(
            "methods: [single,", "methods: [tensor_parallel, single,"))
        keys = _calibration_keys(argparse.Namespace(experiment=str(exp)))
        tp = [k.params for k in keys if k.method == "tensor_parallel"]
        assert tp == [{"all_reduce": a} for a in want]
        assert keys[len(want)].method == "single" and keys[len(want)].params == {}  # nothing to settle
        assert len(keys) == len(want) + 3  # one key per distinct outcome, not per cell


def test_calibrate_stopped_by_sigint(tmp_path):
    """Ctrl-C in a calibration of several profiles: exit 130 with one line, no traceback, nothing half-stored."""
    cal = tmp_path / "cal"
    proc = subprocess.Popen([sys.executable, "-m", "testbed.cli", "calibrate", "--model", "vit-tiny", "--method",
                             "single", "--method", "sequence_parallel", "--tokens", "17", "--nodes", "2",
                             "--repetitions", "100000", "--calibration", str(cal)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # interrupt once the timed rounds run
            if "repetition 1/" in line:
                break
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "stopped by SIGINT" in err and "Traceback" not in err
    assert list(cal.glob("*.json")) == []
