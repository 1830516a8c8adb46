"""Sharded sweeps: `testbed run --shard K/N` on each of N machines, then `testbed merge`, gives the
rows of the same sweep run whole; shards that are not one sweep's are refused with one error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from testbed.cli import main
from testbed.experiment.manifest import read_manifest
from testbed.experiment.shard import Shard, cell_id, select_units, shard_of, sweep_units
from testbed.experiment.spec import parse_spec
from testbed.experiment.store import read_rows, read_traces

from .helpers import tiny, write

# Columns that differ between two runs of the same units for reasons other than sharding: measured
# times (the sim backend's compute times come from measurements on this host; inprocess measures
# wall time), what follows from them (the critical rank, decode rates), when a row was written and a
# node's memory. No row column names the host. Every other column must be equal.
TIMING = ["latency_s", "compute_s", "comm_s", "wait_s", "serialize_s", "critical_rank", "compute_s_mean",
          "comm_s_mean", "ttft_s", "tpot_median_s", "tpot_p95_s", "tokens_per_s", "started_at", "rss_mib",
          "pss_mib", "trace_time_s", "fault_time_s"]

SIM = tiny(backend="sim", methods=["single", "tensor_parallel", "sequence_parallel"], repetitions=2,
           sweep={"bandwidth_mbps": [10, 100]})  # 2 cells x 3 methods = 6 units


def run(*argv: str) -> int:
    return main(["run", *argv, "--quiet", "--no-plots"])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The SIM sweep run as 3 shards and whole (in one directory, sharing the sim's calibration)."""
    d = tmp_path_factory.mktemp("shard")
    cwd = Path.cwd()
    try:
        import os

        os.chdir(d)  # the sim backend's calibration directory is relative (results/calibration)
        exp = write(d / "e.yaml", SIM)
        for k in range(3):
            assert run(str(exp), "--shard", f"{k}/3", "--out", str(d / f"s{k}")) == 0
        assert run(str(exp), "--out", str(d / "whole")) == 0
    finally:
        os.chdir(cwd)
    return d


def comparable(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[c for c in TIMING if c in df]).reset_index(drop=True)


def test_selection_is_balanced_disjoint_and_rotates_methods():
    spec = parse_spec(tiny(methods=["single", "tensor_parallel", "sequence_parallel", "block_parallel"],
                           backend="sim", sweep={"bandwidth_mbps": [1, 2, 3, 4, 5]}))
    units = sweep_units(spec)
    assert len(units) == 20
    for n in (1, 2, 3, 4, 7, 20):
        shares = [select_units(units, Shard(k, n)) for k in range(n)]
        keys = [[cell_id(c, mi) for c, mi, _ in s] for s in shares]
        flat = [k for s in keys for k in s]
        assert sorted(flat) == sorted(cell_id(c, mi) for c, mi, _ in units) and len(set(flat)) == len(flat)
        assert max(map(len, keys)) - min(map(len, keys)) <= 1
        for s in shares:  # each share keeps the sweep's order
            idx = [units.index(u) for u in s]
            assert idx == sorted(idx)
    # 4 methods over 4 shards: every shard runs every method (plain i mod N would give each shard one method)
    for k in range(4):
        assert {mi for _, mi, _ in select_units(units, Shard(k, 4))} == {0, 1, 2, 3}
    assert [shard_of(i, 3) for i in range(9)] == [0, 1, 2, 1, 2, 0, 2, 0, 1]


def test_three_shards_merged_equal_the_whole_sweep(sweep):
    d = sweep
    shard_cells = [set(read_rows(d / f"s{k}")["cell"]) for k in range(3)]
    assert all(len(c) == 2 for c in shard_cells) and not (shard_cells[0] & shard_cells[1] | shard_cells[1]
                                                          & shard_cells[2] | shard_cells[0] & shard_cells[2])
    m0 = read_manifest(d / "s0")
    assert m0["shard"]["index"] == 0 and m0["shard"]["count"] == 3 and len(m0["shard"]["units"]) == 2
    assert m0["experiment_digest"].startswith("sha256:") and m0["code"]["source_digest"].startswith("sha256:")
    assert m0["backend"]["mechanism"] == "sim"

    assert main(["merge", str(d / "merged"), *(str(d / f"s{k}") for k in (2, 0, 1))]) == 0
    merged, whole = read_rows(d / "merged"), read_rows(d / "whole")
    assert list(merged.columns) == list(whole.columns)
    keys = list(zip(merged["cell"], merged["repetition"]))
    assert len(keys) == 12 and len(set(keys)) == 12  # each unit's repetitions exactly once
    assert keys == list(zip(whole["cell"], whole["repetition"]))  # in the whole sweep's order
    pd.testing.assert_frame_equal(comparable(merged), comparable(whole))
    m = read_manifest(d / "merged")
    assert [s["shard"] for s in m["shards"]] == ["0/3", "1/3", "2/3"] and all(s["host"] for s in m["shards"])
    assert m["status"] == "complete" and m["rows"] == 12 and m["failed_rows"] == 0 and m["shard"] is None
    assert m["experiment_digest"] == read_manifest(d / "whole")["experiment_digest"]
    assert (d / "merged" / "rows.parquet").exists() and (d / "merged" / "report.html").exists()
    assert "0/3 on " in (d / "merged" / "report.html").read_text()
    assert {Path(p).stem for p in m["plots"]} >= {"latency", "speedup", "breakdown"}
    assert all((d / "merged" / "shards" / str(k) / "manifest.json").exists() for k in range(3))
    assert len(pd.read_parquet(d / "merged" / "rows.parquet")) == 12


def test_merge_refuses_what_is_not_one_sweeps_shards(sweep, tmp_path, capsys, monkeypatch):
    d = sweep
    s = [str(d / f"s{k}") for k in range(3)]

    def refused(*dirs: str) -> str:
        out = tmp_path / "out"
        capsys.readouterr()
        assert main(["merge", str(out), *dirs]) == 2
        assert not out.exists()  # nothing written
        err = capsys.readouterr().err.strip()
        assert err.startswith("testbed merge: error: ") and len(err.splitlines()) == 1, err
        return err

    err = refused(s[0], s[1])
    assert "2/3 missing" in err and s[0] in err and s[1] in err
    err = refused(s[0], s[1], s[2], s[1])
    assert "shard 1/3 is given twice" in err and err.count(s[1]) == 2

    # another experiment (one more repetition), sharded the same way
    monkeypatch.chdir(d)
    other = write(tmp_path / "other.yaml", {**SIM, "repetitions": 3})
    assert run(str(other), "--shard", "2/3", "--out", str(tmp_path / "o2")) == 0
    err = refused(s[0], s[1], str(tmp_path / "o2"))
    assert "differ in experiment" in err and "repetitions" in err and str(tmp_path / "o2") in err and s[0] in err

    # the same shard made by different code
    changed = tmp_path / "c2"
    shutil.copytree(s[2], changed)
    m = json.loads((changed / "manifest.json").read_text())
    m["code"]["source_digest"] = "sha256:" + "0" * 64
    (changed / "manifest.json").write_text(json.dumps(m))
    err = refused(s[0], s[1], str(changed))
    assert "differ in code version" in err and str(changed) in err

    # the same shard on a machine whose links were shaped another way
    mech = tmp_path / "m2"
    shutil.copytree(s[2], mech)
    m = json.loads((mech / "manifest.json").read_text())
    m["backend"]["mechanism"] = "netem"
    (mech / "manifest.json").write_text(json.dumps(m))
    err = refused(s[0], s[1], str(mech))
    assert "differ in shaping mechanism" in err and "mechanism netem" in err and str(mech) in err

    # a unit of shard 0 also in shard 2's rows
    overlap = tmp_path / "x2"
    shutil.copytree(s[2], overlap)
    first_row = (Path(s[0]) / "rows.csv").read_text().splitlines()[1]
    with open(overlap / "rows.csv", "a") as f:
        f.write(first_row + "\n")
    unit = first_row.split(",")[4]
    err = refused(s[0], s[1], str(overlap))
    assert f"unit {unit} is in two shards" in err and s[0] in err and str(overlap) in err

    err = refused(s[0], s[1], str(d / "whole"))
    assert "is a whole run, not a shard" in err


@pytest.mark.parametrize("bad", ["3/3", "a/b", "0/0", "-1/2", "1", "6/7"])
def test_bad_shard_values_are_one_error_naming_the_flag(tmp_path, capsys, bad):
    exp = write(tmp_path / "e.yaml", SIM)
    out = tmp_path / "out"
    assert run(str(exp), f"--shard={bad}", "--out", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("testbed run: error: --shard: got ")
    assert ("0 <= K < N" in err) if bad != "6/7" else ("N <= 6" in err)  # 7 shards of 6 units: one would be empty
    assert not out.exists()


def test_resume_of_a_shard_measures_only_its_missing_units(tmp_path, monkeypatch, capsys):
    """An inprocess shard (real outputs and traces) cut short, then resumed: it ends with its own units,
    each repetition once, and the merge's traces equal the rows."""
    monkeypatch.chdir(tmp_path)
    data = tiny(methods=["single", "tensor_parallel", "sequence_parallel"], repetitions=2)
    exp = write(tmp_path / "e.yaml", data)
    for k in range(3):
        assert run(str(exp), "--shard", f"{k}/3", "--out", str(tmp_path / f"s{k}")) == 0
    s1 = tmp_path / "s1"
    full = read_rows(s1)
    lines = (s1 / "rows.csv").read_text().splitlines(keepends=True)
    (s1 / "rows.csv").write_text("".join(lines[:2]))  # as if stopped after its first row
    m = json.loads((s1 / "manifest.json").read_text())
    (s1 / "manifest.json").write_text(json.dumps({**m, "status": "interrupted"}))
    assert main(["merge", str(tmp_path / "early"), *(str(tmp_path / f"s{k}") for k in range(3))]) == 2
    assert "did not finish" in capsys.readouterr().err

    assert run(str(exp), "--resume", str(s1), "--shard", "0/3") == 2  # not the shard it was started as
    assert "--shard: got '0/3'" in capsys.readouterr().err
    assert main(["run", "--resume", str(s1), "--quiet", "--no-plots"]) == 0
    rows = read_rows(s1)
    assert sorted(zip(rows["cell"], rows["repetition"])) == sorted(zip(full["cell"], full["repetition"]))
    assert read_manifest(s1)["shard"]["index"] == 1 and set(rows["cell"]) == {"p0/m1"}

    assert main(["merge", str(tmp_path / "merged"), *(str(tmp_path / f"s{k}") for k in range(3))]) == 0
    merged = read_rows(tmp_path / "merged")
    assert list(zip(merged["cell"], merged["repetition"])) == [(f"p0/m{m}", r) for m in range(3) for r in range(2)]
    assert (merged["agreement"] == 1.0).all()
    traces = read_traces(tmp_path / "merged")
    assert sorted((t["cell"], t["repetition"]) for t in traces) == sorted(zip(merged["cell"], merged["repetition"]))


def test_the_python_api_runs_and_merges_shards(tmp_path, monkeypatch):
    from testbed.experiment import api

    monkeypatch.chdir(tmp_path)
    exp = api.experiment(SIM, repetitions=1)
    runs = [api.run(exp, out=tmp_path / f"s{k}", shard=f"{k}/2", plots=False) for k in range(2)]
    assert [len(r.rows) for r in runs] == [3, 3] and all(r.manifest["shard"]["count"] == 2 for r in runs)
    merged = api.merge(tmp_path / "merged", [r.dir for r in runs], plots=False)
    assert len(merged.rows) == 6 and merged.manifest["shards"][1]["shard"] == "1/2"
    with pytest.raises(api.ConfigError, match="shard: got '2/2'"):
        api.run(exp, out=tmp_path / "bad", shard="2/2")
    assert not (tmp_path / "bad").exists()
