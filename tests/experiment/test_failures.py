"""A node that dies mid-sweep: its cell is recorded as failed rows with the error, the nodes are
restarted, and the rest of the sweep is measured normally; a resume with retry_failed measures the
failed units again, keeping their error rows as superseded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from testbed.experiment.store import read_rows, read_traces

from .helpers import tiny, write
from .test_resume import children, resume_run


def test_killed_node_fails_its_cell_and_the_sweep_goes_on(tmp_path):
    data = tiny(backend="loopback", model="vit-small", input={"tokens": 65},
                methods=["single", "sequence_parallel", "sequence_parallel_int8"], repetitions=6, warmup=1,
                timeout_s=30)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "testbed.cli", "run", str(write(tmp_path / "e.yaml", data)),
                             "--out", str(out), "--quiet", "--no-plots"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rows_csv, deadline = out / "rows.csv", time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if rows_csv.exists() and rows_csv.read_text().count("\n") >= 3:
            break
        time.sleep(0.02)
    nodes = children(proc.pid)
    assert proc.poll() is None and len(nodes) == 2
    # rank 1 by its address, not by pid order (pids wrap around)
    rank1 = [p for p in nodes if "127.0.0.2:" in open(f"/proc/{p}/cmdline").read().replace("\0", " ")]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr  # some rows failed
    rows = read_rows(out)
    keys = list(zip(rows["cell"], rows["repetition"]))
    assert len(keys) == 18 and len(set(keys)) == 18
    failed = rows[rows["status"] == "error"]
    assert 1 <= len(failed) and failed["error"].str.len().gt(0).all()
    assert "rank 1" in failed["error"].iloc[0] or "127.0.0.2" in failed["error"].iloc[0], failed["error"].iloc[0]
    last_cell = rows[rows["cell"] == "p0/m2"]
    assert (last_cell["status"] == "ok").all()  # measured on restarted nodes
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"]["starts"] == 2 and manifest["failed_rows"] == len(failed)

    o = resume_run(out, retry_failed=True)
    assert (o.status, o.rows, o.failed_rows, o.measured_now) == ("complete", 18, 0, len(failed))
    again = read_rows(out)
    assert len(again) == 18 and (again["status"] == "ok").all()
    assert set(zip(again["cell"], again["repetition"])) == set(keys)
    every = read_rows(out, superseded=True)
    assert len(every) == 18 + len(failed)
    old = every[every["superseded"]]
    assert old[["cell", "repetition", "status", "error", "started_at"]].values.tolist() == \
        failed[["cell", "repetition", "status", "error", "started_at"]].values.tolist()
    assert len(read_traces(out)) == 18
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["failed_rows"], manifest["superseded_rows"]) == (0, len(failed))
