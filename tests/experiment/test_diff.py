"""`testbed diff`: two runs of one tiny experiment side by side; a changed experiment is flagged."""

from __future__ import annotations

import json

import pytest

from testbed.cli import main
from testbed.experiment import api
from testbed.experiment.diff import compare, warnings
from tests.experiment.helpers import tiny


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("diff")
    # the simulator: the same experiment and compute profiles give the same latencies, so the ratios are 1
    exp = api.experiment(tiny(methods=["single", "sequence_parallel"], repetitions=3, backend="sim",
                              sweep={"bandwidth_mbps": [10, 100], "loss_pct": [0, 1]}))
    sim = {"calibration": str(d / "calibration")}
    a = api.run(exp, out=d / "a", plots=False, settings=sim)
    b = api.run(exp, out=d / "b", plots=False, settings=sim)
    c = api.run(api.experiment(exp, input={"tokens": 33, "seed": 0}), out=d / "c", plots=False, settings=sim)
    return a, b, c


def test_two_runs_of_the_same_experiment(runs, capsys):
    a, b, _ = runs
    t = compare(a.rows, b.rows)
    assert len(t) == 2 * 2 * 2 and set(t["reps_a"]) == {3}
    assert list(t.columns[:3]) == ["bandwidth_mbps", "loss_pct", "method"]  # the swept dimensions kept apart
    assert t["ratio"].tolist() == pytest.approx([1.0] * 8)
    assert (t["ratio_lo"] <= t["ratio"]).all() and (t["ratio"] <= t["ratio_hi"]).all()
    assert main(["diff", str(a.dir), str(b.dir)]) == 0
    out = capsys.readouterr().out
    assert "warning" not in out and "8 configurations x methods in both" in out and "ratio B/A" in out


def test_a_changed_experiment_is_flagged(runs, capsys):
    a, _, c = runs
    assert main(["diff", str(a.dir), str(c.dir)]) == 0
    out = capsys.readouterr().out
    assert "warning: the runs differ in experiment (input:" in out
    t = compare(a.rows, c.rows)  # tokens differ: a dimension, so no cell is in both
    assert len(t) == 0 and "8 only in A; 8 only in B" in out


def test_warnings_name_code_backend_mechanism_dilation_and_host(runs):
    m = runs[0].manifest
    other = json.loads(json.dumps(m))
    other["git"] = {"commit": "0" * 40, "dirty": True}
    other["backend"]["mechanism"] = "htb+netem"
    other["backend"]["name"] = "inprocess"
    other["time_dilation"]["factor"] = 2.67
    other["machine"]["host"] = "elsewhere"
    text = "\n".join(warnings(m, other))
    for what in ("code version", "backend", "mechanism", "time dilation", "host (host:"):
        assert f"differ in {what}" in text
    assert warnings(m, m) == []


def test_not_a_run(tmp_path, capsys):
    assert main(["diff", str(tmp_path), str(tmp_path)]) == 2
    assert "run directory" in capsys.readouterr().err
