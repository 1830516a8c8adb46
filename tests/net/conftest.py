"""Fixtures of the emulation tests: ``start_victim`` starts a run to be interrupted (victim.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

VICTIM = Path(__file__).with_name("victim.py")


@pytest.fixture
def start_victim():
    """``start_victim(mode)`` -> (process, run id, keeper pid) once the victim is busy.

    Victims still running when the test ends (it failed early) are stopped: their own teardown
    removes what they built, so a failing test leaks nothing either."""
    procs: list[subprocess.Popen] = []

    def start(mode: str, timeout_s: float = 180) -> tuple[subprocess.Popen, str, int]:
        # A shell starting a job in the background makes it ignore SIGINT, and children inherit that
        # (a CI runner may do so): give the victim SIGINT's default, as a terminal's Ctrl-C finds it.
        proc = subprocess.Popen([sys.executable, str(VICTIM), mode], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=str(VICTIM.parents[2]),
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        procs.append(proc)
        run_id, keeper, deadline = None, None, time.monotonic() + timeout_s
        for line in proc.stdout:
            if line.startswith("run "):
                run_id, keeper = line.split()[1], int(line.split()[3])
            if line.startswith("busy") or time.monotonic() > deadline:
                break
        if run_id is None or proc.poll() is not None:
            proc.kill()
            pytest.fail(f"victim did not start: {proc.stderr.read()[-2000:]}")
        return proc, run_id, keeper

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
