"""A sweep stopped by SIGTERM keeps what it measured and tears its nodes down; `--resume` then
measures only what is missing, so every (cell, repetition) ends up in rows.csv exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from testbed.experiment.store import read_rows, read_traces

from .helpers import tiny, write


def children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def start_run(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "testbed.cli", "run", *args, "--quiet"], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_then_resume_gives_every_cell_once(tmp_path):
    data = tiny(backend="loopback", model="vit-small", input={"tokens": 65},
                methods=["single", "sequence_parallel", "tensor_parallel"], repetitions=8, warmup=1)
    exp, out = write(tmp_path / "e.yaml", data), tmp_path / "out"
    proc = start_run(str(exp), "--out", str(out), cwd=tmp_path)
    deadline = time.monotonic() + 120
    rows_csv = out / "rows.csv"
    while time.monotonic() < deadline and proc.poll() is None:
        if rows_csv.exists() and rows_csv.read_text().count("\n") >= 3:  # header + 2 rows
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    nodes = children(proc.pid)
    assert len(nodes) == 2  # the loopback node processes
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted" in stdout and f"--resume {out}" in stdout
    deadline = time.monotonic() + 10
    while any(alive(p) for p in nodes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in nodes), "node processes outlived the run"
    first = read_rows(out)
    total = 3 * 8
    assert 2 <= len(first) < total and (first["status"] == "ok").all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["rows"] == len(first)

    again = start_run("--resume", str(out), cwd=tmp_path)
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    rows = read_rows(out)
    keys = list(zip(rows["cell"], rows["repetition"]))
    assert len(keys) == total and len(set(keys)) == total
    assert set(keys) == {(f"p0/m{m}", r) for m in range(3) for r in range(8)}
    assert (rows["status"] == "ok").all()
    assert rows.iloc[: len(first)]["started_at"].tolist() == first["started_at"].tolist()  # kept, not redone
    assert len(read_traces(out)) == total
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and [s["resumed"] for s in manifest["sessions"]] == [False, True]
    assert f"{total} rows (0 failed, {total - len(first)} measured now)" in stdout


def test_resume_refuses_a_different_experiment(tmp_path, capsys):
    from testbed.experiment.cli import run_main

    exp = write(tmp_path / "e.yaml", tiny(methods=["single"], repetitions=1))
    assert run_main([str(exp), "--out", str(tmp_path / "out"), "--quiet", "--no-plots"]) == 0
    other = write(tmp_path / "f.yaml", tiny(methods=["single"], repetitions=2))
    assert run_main([str(other), "--resume", str(tmp_path / "out")]) == 2
    assert "differs in: repetitions" in capsys.readouterr().err
    assert run_main(["--resume", str(tmp_path / "out"), "--quiet"]) == 0  # nothing left to do
    assert len(read_rows(tmp_path / "out")) == 1


def _failed_run(tmp_path: Path) -> Path:
    """A run directory whose repetition 1 failed: the rows, traces and manifest of a complete run, with
    that repetition's row as the error row the runner writes when a node dies (and no trace for it)."""
    from testbed.experiment.cli import run_main
    from testbed.experiment.store import ResultStore

    exp, src, out = write(tmp_path / "e.yaml", tiny(methods=["single"], repetitions=3)), tmp_path / "src", tmp_path / "out"
    assert run_main([str(exp), "--out", str(src), "--quiet", "--no-plots"]) == 0
    traces = {t["repetition"]: t["ranks"] for t in read_traces(src)}
    with ResultStore(out) as store:
        for row in read_rows(src).to_dict("records"):
            if row["repetition"] == 1:
                row.update(latency_s=None, compute_s=None, agreement=None, status="error",
                           error="repetition 1: RuntimeError: rank 1 is gone")
            store.append(row, traces[row["repetition"]] if row["status"] == "ok" else None)
    (out / "manifest.json").write_text((src / "manifest.json").read_text())
    return out


def resume_run(out: Path, retry_failed: bool):
    from testbed.experiment.manifest import read_manifest
    from testbed.experiment.runner import Runner
    from testbed.experiment.spec import parse_spec, with_output_dir

    spec = with_output_dir(parse_spec(read_manifest(out)["config"]), str(out.resolve()))
    return Runner(spec, out, resume=True, retry_failed=retry_failed, progress=False, plots=False).run()


def test_resume_keeps_error_rows_unless_asked_to_retry_them(tmp_path):
    out = _failed_run(tmp_path)
    before = (out / "rows.csv").read_text()
    o = resume_run(out, retry_failed=False)
    assert (o.status, o.rows, o.failed_rows, o.measured_now) == ("complete", 3, 1, 0)
    assert (out / "rows.csv").read_text() == before
    assert read_rows(out)["status"].tolist() == ["ok", "error", "ok"]
    assert [r["repetition"] for r in read_traces(out)] == [0, 2]

    o = resume_run(out, retry_failed=True)
    assert (o.status, o.rows, o.failed_rows, o.measured_now) == ("complete", 3, 0, 1)
    assert (out / "rows.csv").read_text().startswith(before)  # append-only: the error row is still there
    current = read_rows(out)
    assert list(zip(current["repetition"], current["status"])) == [(0, "ok"), (2, "ok"), (1, "ok")]
    every = read_rows(out, superseded=True)
    assert every["superseded"].tolist() == [False, True, False, False]
    old = every[every["superseded"]].iloc[0]
    assert (old["repetition"], old["status"], old["error"]) == (1, "error", "repetition 1: RuntimeError: rank 1 is gone")
    assert sorted(r["repetition"] for r in read_traces(out)) == [0, 1, 2]
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["rows"], manifest["failed_rows"], manifest["superseded_rows"]) == (3, 0, 1)

    (out / "rows.csv").rename(out / "rows.csv.bak")  # rows.parquet holds every row too
    assert read_rows(out, superseded=True)["superseded"].tolist() == [False, True, False, False]
    assert read_rows(out)["status"].tolist() == ["ok", "ok", "ok"]
    (out / "rows.csv.bak").rename(out / "rows.csv")

    o = resume_run(out, retry_failed=True)  # nothing failed any more: nothing to measure
    assert (o.rows, o.failed_rows, o.measured_now) == (3, 0, 0)


def test_resume_of_a_directory_written_with_fewer_columns_keeps_its_header(tmp_path):
    """A run directory from before columns were added: resumed rows fit the header it has."""
    from testbed.experiment.store import COLUMNS

    out = _failed_run(tmp_path)
    old = [c for c in COLUMNS if c not in ("faults", "fault_time_s")]
    rows = read_rows(out)
    rows[old].iloc[:2].to_csv(out / "rows.csv", index=False)  # repetition 2 not measured yet
    o = resume_run(out, retry_failed=True)
    assert (o.status, o.rows, o.failed_rows, o.measured_now) == ("complete", 3, 0, 2)
    again = read_rows(out, superseded=True)
    assert list(again.columns) == [*old, "superseded"] and again["superseded"].tolist() == [False, True, False, False]
    assert (read_rows(out)["status"] == "ok").all()


def test_retry_failed_measures_again_a_unit_failed_by_a_node_killed_from_outside(tmp_path):
    """A node server SIGKILLed while `testbed run` infers fails that repetition (and skips the rest
    of its unit); `--resume --retry-failed` measures those units again: every unit ends ok, the
    error rows stay in rows.csv marked superseded."""
    from testbed.bench.soak import node_pids
    from tests.experiment.test_interrupts import ROOT, interrupt_at

    exp = write(tmp_path / "e.yaml", tiny(backend="loopback", methods=["single", "tensor_parallel"],
                                          repetitions=200, warmup=1, timeout_s=30))
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "testbed.cli", "run", str(exp), "--out", str(out), "--no-plots"],
                            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

    def kill_a_node(p: subprocess.Popen) -> None:
        os.kill(node_pids(p.pid)[1], signal.SIGKILL)

    stdout, stderr = interrupt_at(proc, "| tensor_parallel", 0, on_marker=kill_a_node)
    assert proc.returncode == 1, stdout + stderr  # some rows failed
    rows = read_rows(out)
    assert len(rows) == 400 and (rows["status"] == "error").any()
    failed = set(zip(rows.loc[rows["status"] != "ok", "cell"], rows.loc[rows["status"] != "ok", "repetition"]))

    again = subprocess.run([sys.executable, "-m", "testbed.cli", "run", "--resume", str(out), "--retry-failed",
                            "--quiet", "--no-plots"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    current = read_rows(out)
    assert len(current) == 400 and (current["status"] == "ok").all()
    every = read_rows(out, superseded=True)
    old = every[every["superseded"]]
    assert len(every) == 400 + len(failed) and set(zip(old["cell"], old["repetition"])) == failed
    assert (old["status"] == "error").all()
