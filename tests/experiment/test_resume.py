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
