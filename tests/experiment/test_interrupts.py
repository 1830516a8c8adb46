"""SIGINT and SIGTERM in every phase of `testbed run` end with 128+signal, one line saying what was
kept, no traceback and no abort, and a directory that `--resume` continues (or nothing written).

Each case starts a real `testbed run` subprocess, waits for the progress line of the phase, then
sends the signal. The models are sized so that each phase lasts seconds, not milliseconds.
Phases of the emulated backends (network build, node start) are in tests/net/test_teardown_root.py
and tests/experiment/test_interrupts_root.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.experiment.helpers import write

ROOT = Path(__file__).resolve().parents[2]

# vit-base at 1024 tokens: fitting codebooks, the reference forward and each inference take seconds
SLOW = {"name": "interrupts", "model": {"name": "vit-base"}, "input": {"tokens": 1024, "seed": 0},
        "methods": ["single", {"name": "astra", "params": {"groups": 1, "codebook_size": 16}}],
        "nodes": {"count": 2}, "topology": "star", "backend": "inprocess", "repetitions": 2, "warmup": 0,
        "timeout_s": 120}
# the simulator: many cells, measured fast, whose plots take a while to draw
SIM = {"name": "interrupts-sim", "model": {"name": "vit-tiny"}, "input": {"tokens": 17, "seed": 0},
       "methods": ["single", "tensor_parallel", "sequence_parallel", "sequence_parallel_int8", "block_parallel",
                   {"name": "astra", "params": {"groups": 1, "codebook_size": 16}}],
       "nodes": {"count": 2}, "topology": "star", "backend": "sim", "repetitions": 1, "warmup": 0,
       "sweep": {"bandwidth_mbps": [5, 10, 20, 50, 100, 200], "delay_ms": [0, 5, 20], "loss_pct": [0, 1]}}


def start_run(exp: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "testbed.cli", "run", str(exp), "--out", str(out)], cwd=ROOT,
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def interrupt_at(proc: subprocess.Popen, marker: str, sig: int, deadline_s: float = 300,
                 on_marker=None) -> tuple[str, str]:
    """Read stderr until a line contains ``marker``, send ``sig`` (or call ``on_marker(proc)``), wait
    for the run to end; return (stdout, stderr)."""
    lines: list[str] = []
    seen = threading.Event()

    def pump() -> None:
        for line in proc.stderr:
            lines.append(line)
            if marker in line:
                seen.set()
        seen.set()  # stderr closed: the run ended before the phase

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    seen.wait(deadline_s)
    assert proc.poll() is None and any(marker in ln for ln in lines), "".join(lines)
    if on_marker is not None:
        on_marker(proc)
    else:
        proc.send_signal(sig)
    try:
        out = proc.stdout.read()
        proc.wait(timeout=300)
    finally:
        proc.kill()
    t.join(10)
    return out, "".join(lines)


def check_stopped(proc: subprocess.Popen, sig: int, out_dir: Path, stdout: str, stderr: str) -> str:
    """The documented ending; returns the last stderr line."""
    text = stdout + stderr
    assert proc.returncode == 128 + sig, text
    assert "Traceback" not in text and "terminate called" not in text, text
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"testbed run: stopped by {signal.Signals(sig).name}: "), last
    if (out_dir / "manifest.json").exists():
        assert f"continue with: testbed run --resume {out_dir}" in last, last
        assert json.loads((out_dir / "manifest.json").read_text())["config"]["name"], "resume reads the config"
    else:
        assert "nothing written" in last, last
        assert not out_dir.exists() or not any(out_dir.iterdir()), sorted(out_dir.rglob("*"))
    return last


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("phase, marker", [
    ("validation", "its codebooks"),  # fit: every test has its own empty user cache
    ("reference", "computing the single-device reference"),
    ("inference", "| astra"),
])
def test_signal_in_each_inprocess_phase(tmp_path, phase, marker, sig):
    out = tmp_path / "out"
    proc = start_run(write(tmp_path / "e.yaml", SLOW), out)
    stdout, stderr = interrupt_at(proc, marker, sig)
    check_stopped(proc, sig, out, stdout, stderr)
    if phase == "inference" and sig == signal.SIGTERM:  # what was measured is kept and the run goes on
        rows_before = (out / "rows.csv").read_text().count("\n") - 1
        assert rows_before >= 2  # both repetitions of single
        done = subprocess.run([sys.executable, "-m", "testbed.cli", "run", "--resume", str(out), "--quiet",
                               "--no-plots"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        assert (out / "rows.csv").read_text().count("\n") - 1 == 4


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_while_plotting(tmp_path, sig):
    """The simulator measures 216 rows in seconds; their plots take longer to draw."""
    out = tmp_path / "out"
    proc = start_run(write(tmp_path / "e.yaml", SIM), out)
    stdout, stderr = interrupt_at(proc, "drawing plots", sig)
    check_stopped(proc, sig, out, stdout, stderr)
    assert (out / "rows.csv").read_text().count("\n") - 1 == 6 * 6 * 3 * 2  # every row was kept


def test_a_stop_signal_whose_raise_python_dropped_is_raised_at_the_next_check(capsys):
    """Python drops an exception raised by a signal handler inside code whose exceptions it ignores
    (an at-fork hook, a __del__): the signal is kept and the runner's next check raises it, silently."""
    from testbed.experiment.runner import SIGNALLED, Interrupted, _raise_interrupted, quiet_dropped_interrupts, \
        stop_if_signalled

    class DropsIt:
        def __del__(self):
            _raise_interrupted(signal.SIGINT, None)  # as if the signal landed here

    SIGNALLED.clear()
    stop_if_signalled()  # nothing received: no raise
    with quiet_dropped_interrupts():
        x = DropsIt()
        del x  # the raise is dropped here
        with pytest.raises(Interrupted) as e:
            stop_if_signalled()
    assert e.value.signum == signal.SIGINT
    assert "Exception ignored" not in capsys.readouterr().err
    SIGNALLED.clear()


def test_a_stop_signal_the_emulations_guard_got_inside_a_dropped_raise_still_stops_the_sweep(capsys):
    """While a backend starts, the emulation's signal guard sits on top of the runner's handler; a
    SIGTERM landing in a code path whose exceptions Python ignores (here a __del__, in a real run
    logging's at-fork hook as a host forks) must still be noted for the runner's next check."""
    from testbed.experiment.runner import SIGNALLED, Interrupted, _raise_interrupted, quiet_dropped_interrupts, \
        stop_if_signalled
    from testbed.net.emulation import _SignalGuard

    old = signal.signal(signal.SIGTERM, _raise_interrupted)
    guard = _SignalGuard(lambda: None)
    try:
        handler = signal.getsignal(signal.SIGTERM)
        assert handler == guard._raise

        class DropsIt:
            def __del__(self):
                handler(signal.SIGTERM, None)  # as if the signal landed here

        SIGNALLED.clear()
        with quiet_dropped_interrupts():
            x = DropsIt()
            del x
            with pytest.raises(Interrupted) as e:
                stop_if_signalled()
        assert e.value.signum == signal.SIGTERM
    finally:
        guard.remove()
        signal.signal(signal.SIGTERM, old)
        SIGNALLED.clear()
    assert signal.getsignal(signal.SIGTERM) == old


def test_signals_held_wait_for_the_end_of_the_block():
    """Teardown and lock-taking code run with stop signals held: the handler runs after the block."""
    import time

    from testbed.comm.inprocess import signals_held

    got: list[int] = []
    old = signal.signal(signal.SIGINT, lambda s, _f: got.append(s))
    try:
        with signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert got == []
        deadline = time.monotonic() + 2
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, old)


def _frame_of_module(name: str):
    """A real frame whose code belongs to module ``name``."""
    g = {"__name__": name, "sys": sys}
    exec("def here():\n    return sys._getframe()\n", g)
    return g["here"]()


def test_a_stop_signal_inside_grpc_is_raised_once_the_main_thread_is_out_of_it():
    import time

    from testbed.experiment import runner

    grpc_frame, own_frame = _frame_of_module("grpc._channel"), _frame_of_module("testbed.node.orchestrator")
    old = signal.signal(signal.SIGTERM, runner._raise_interrupted)
    runner.SIGNALLED.clear()
    runner.RAISED.clear()
    try:
        runner._raise_interrupted(signal.SIGTERM, grpc_frame)  # not raised inside gRPC's bookkeeping ...
        assert runner.SIGNALLED == [signal.SIGTERM] and not runner.RAISED
        with pytest.raises(runner.Interrupted):  # ... but a moment later, out here
            time.sleep(5)
        assert runner.RAISED == [signal.SIGTERM]
        runner._raise_interrupted(signal.SIGTERM, grpc_frame)  # already stopping: no retry follows
        time.sleep(4 * runner.GRPC_RETRY_S)
        with pytest.raises(runner.Interrupted):  # anywhere else it is raised at once, as always
            runner._raise_interrupted(signal.SIGTERM, own_frame)
    finally:
        signal.signal(signal.SIGTERM, old)
        runner.SIGNALLED.clear()
        runner.RAISED.clear()
