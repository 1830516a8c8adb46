"""Benchmark: profiles measured one after the other against interleaved, under a slow phase of the host.

    python -m testbed.bench.calibration [--model vit-base] [--tokens 197] [--repetitions 3]

A shared host has slower and faster phases lasting seconds to minutes, and a calibration is
minutes long. This measures the same profiles (every method of the quickstart's grid, 4 nodes)
three times in one run and compares each profile's critical-rank compute with the first:

1. ``quiet``: interleaved (``testbed.sim.calibrate.measure_interleaved``), nothing else running;
2. ``sequential``: each profile's repetitions back to back, one profile after the other;
3. ``interleaved``: all profiles' repetitions round-robin.

During 2 and 3 a slow phase is made on purpose for the middle third of the timed inferences (by
count, so both see the same share): one process per core streams arrays several times the size of
the last-level cache (sharing the calibration's core too: its caches and memory bandwidth, not its
CPU time, are what the phase takes), paused (SIGSTOP) outside the phase and killed at the end. The
host probe taken right before each timed inference says how much the phase slowed the host. One
after the other, the profiles measured during the phase carry all of it; interleaved, the phase
falls on one repetition of every profile and their medians drop it.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

#: the load of the slow phase: a copy between two arrays of this many bytes each, in a loop
HOG_BYTES = 256 << 20
HOG = ("import numpy as np\n"
       f"a = np.ones({HOG_BYTES // 8}); b = np.empty_like(a)\n"
       "while True:\n"
       "    np.copyto(b, a); np.copyto(a, b)\n")
METHODS = (("single", {}), ("tensor_parallel", {}), ("sequence_parallel", {}), ("sequence_parallel_int8", {}),
           ("block_parallel", {"n_b": 1}), ("astra", {"groups": 1, "codebook_size": 1024}),
           ("astra", {"groups": 32, "codebook_size": 1024}))


class SlowPhase:
    """The probe hook of a calibration: counts timed inferences and runs ``HOG`` during slots
    [start, stop) of them; ``probes`` records the host probe before each slot with the phase flag."""

    def __init__(self, hogs: list[subprocess.Popen], start: int, stop: int):
        from testbed.models.probe import host_probe_s

        self.hogs, self.start, self.stop, self.slot = hogs, start, stop, 0
        self.probes: list[tuple[bool, float]] = []
        self._probe = host_probe_s

    def __call__(self) -> float:
        on = self.start <= self.slot < self.stop
        for hog in self.hogs:
            os.kill(hog.pid, signal.SIGCONT if on else signal.SIGSTOP)
        if self.hogs and on:
            time.sleep(0.2)  # the load back on the other core before the probe and the inference
        self.slot += 1
        value = self._probe()
        self.probes.append((on, value))
        return value


def start_hog() -> subprocess.Popen:
    """The slow phase's load, started paused."""
    hog = subprocess.Popen([sys.executable, "-c", HOG], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    time.sleep(1.0)  # its arrays allocated and touched
    os.kill(hog.pid, signal.SIGSTOP)
    return hog


def run(model: str = "vit-base", tokens: int = 197, nodes: int = 4, repetitions: int = 3, warmup: int = 1,
        methods=METHODS, slow_phase: bool = True, log=print) -> dict:
    """The three calibrations; per profile its critical-rank compute in each, and the probes."""
    from testbed.methods.job import JobSpec
    from testbed.sim.calibrate import measure_interleaved

    jobs = [JobSpec(model, m, nodes, tokens, p) for m, p in methods]
    names = [m + (" " + " ".join(f"{k}={v}" for k, v in p.items()) if p else "") for m, p in methods]
    timed = repetitions * len(jobs)
    out: dict = {"profiles": names, "compute_s": {}, "probes": {}}
    hogs = [start_hog() for _ in range(os.cpu_count() or 1)] if slow_phase else []
    out["hog_pids"] = [h.pid for h in hogs]
    try:
        for mode in ("quiet", "sequential", "interleaved"):
            t0 = time.perf_counter()
            hook = SlowPhase([], 0, 0) if mode == "quiet" else SlowPhase(hogs, timed // 3, 2 * timed // 3)
            if mode == "sequential":
                measured = [measure_interleaved([job], repetitions, warmup, probe=hook)[0] for job in jobs]
            else:
                measured = measure_interleaved(jobs, repetitions, warmup, probe=hook)
            out["compute_s"][mode] = [max(t.compute_s for t in m.traces) for m in measured]  # the busiest rank
            out["probes"][mode] = hook.probes
            log(f"  {mode}: {time.perf_counter() - t0:.0f} s")
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    return out


def report(out: dict) -> str:
    c = out["compute_s"]
    lines = [f"{'profile':<36} {'quiet s':>8} {'sequential':>11} {'interleaved':>12}   (compute / quiet)"]
    for i, name in enumerate(out["profiles"]):
        lines.append(f"{name:<36} {c['quiet'][i]:8.4f} {c['sequential'][i] / c['quiet'][i]:11.3f} "
                     f"{c['interleaved'][i] / c['quiet'][i]:12.3f}")
    for mode in ("sequential", "interleaved"):
        r = [a / b for a, b in zip(c[mode], c["quiet"])]
        on = [v for flag, v in out["probes"][mode] if flag]
        off = [v for flag, v in out["probes"][mode] if not flag]
        phase = (f"probe in the slow phase / outside it {statistics.median(on) / statistics.median(off):.3f}"
                 if on and off else "no slow phase")
        lines.append(f"{mode}: profiles {min(r):.3f}-{max(r):.3f} of quiet, spread between profiles "
                     f"{max(r) / min(r) - 1:.1%}; {phase}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.bench.calibration", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit-base")
    p.add_argument("--tokens", type=int, default=197)
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--no-slow-phase", action="store_true", help="no load: the host's own phases only")
    args = p.parse_args(argv)
    print(f"calibrating {len(METHODS)} profiles of {args.model}, {args.tokens} tokens, 4 nodes, three times "
          f"({args.repetitions} repetitions each)", flush=True)
    print(report(run(args.model, args.tokens, repetitions=args.repetitions, slow_phase=not args.no_slow_phase,
                     log=lambda m: print(m, flush=True))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
