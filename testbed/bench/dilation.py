"""Benchmark: is time-dilated emulation faithful, and does it make results independent of the host?

``python -m testbed.bench.dilation`` (root) prints, measured side by side in one run:

1. quota: slowdown / F of a fixed forward pass (vit-small, 197 tokens, 1 thread) run by 1, 2 and
   4 device processes at once, each in the cgroup a device of speed 1 gets under dilation F
   (testbed.net.cgroups: quota of 1/F core, 10 ms slices, pinned), for F = 1, 2, 2.5, 4. Each
   configuration alternates with the same forward alone and unconfined (the reference), so drift
   of a shared machine cancels. Target 0.95-1.05 wherever the quotas fit the host.
2. consistency: one experiment (vit-small, 2 nodes, 20 and 100 Mbit/s x 1 and 10 ms) run
   undilated with a dedicated core per node, then at F = 2 and F = 3; median latency per method
   and profile under dilation / undilated. Target 0.95-1.05.
3. host independence: one 4-node experiment run with the runner confined to 1 core and to 2
   cores (taskset), F from auto each time; ratio of median latencies. Target 0.93-1.07.

4. segments: device time of a short compute segment (3 and 12 ms of CPU) after an idle gap of
   0, 5 and 60 ms, over its time on a free core, at F = 2.5 with 10 and 2 ms slices (one
   device). Target 1.0; below it, the device ran part of the segment at host speed: a period's
   quota it left unused while idle (CFS bandwidth control refills it every period). Beside it the
   same segments paced to the quota's rate (testbed.comm.trace.CpuPacer, what nodes do by default).

5. throttling overhead over time: CPU seconds of the host probe's block (testbed.models.probe),
   10 at a time, in a device's cgroup at the delay references' dilation (F = 2.67, 10 ms slices)
   over the same on a free core, alternated round by round for ``--seconds``: what one
   ``compute_scale`` stands for in the simulator, and how much it moves from one round to the next.

6. devices computing together: CPU seconds of 4 devices' processes (quotas at F = 2.67, pinned as
   the runner pins them) computing at once over the same computing one at a time, for a quarter
   of a 197-token vit-base forward (what a rank of sequence parallel or ASTRA computes), the whole
   forward (``single``: one device computes) and the probe block (what the device probe runs).
   The simulator's profiles are measured with ranks taking turns; emulated devices of sharded
   methods compute at the same time.

Parts 2 and 3 run `testbed run` in a subprocess, as a user would. ``--parts`` picks parts
(default 1,2,3,4,5,6); ``--quick`` fewer repetitions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from testbed.net.cgroups import DeviceCgroup, allocate_cores, host_cpus
from testbed.net.topology import DeviceProfile

FACTORS = (1.0, 2.0, 2.5, 4.0)
NODE_COUNTS = (1, 2, 4)


# ------------------------------------------------------------------ part 1
class _Worker:
    def __init__(self, cgroup: DeviceCgroup | None, model: str = "vit-small", tokens: int = 197):
        pre = cgroup.join if cgroup is not None else None
        self.proc = subprocess.Popen([sys.executable, "-m", "testbed.bench.forward_worker", model, str(tokens)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, preexec_fn=pre, cwd=str(Path(__file__).resolve().parents[2]))
        assert self.proc.stdout.readline().strip() == "ready"

    def start(self, n: int) -> None:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()

    def result(self) -> float:
        """Wall seconds of the forwards started last."""
        return self.wall_cpu_s()[0]

    def wall_cpu_s(self) -> tuple[float, float]:
        """Wall and CPU seconds of the forwards started last."""
        wall, cpu = self.proc.stdout.readline().split()
        return float(wall), float(cpu)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def quota_table(rounds: int, forwards: int) -> list[dict]:
    cpus = host_cpus()
    ref = _Worker(None)
    rows = []
    try:
        for k in NODE_COUNTS:
            for f in FACTORS:
                devs = [DeviceProfile(speed=1.0, threads=1).dilated(f)] * k
                groups = [DeviceCgroup(f"tbbench-dil{i}", d, c) for i, (d, c) in
                          enumerate(zip(devs, allocate_cores(devs, cpus)))]
                for g in groups:
                    g.create()
                workers = [_Worker(g) for g in groups]
                try:
                    alone, confined = [], []
                    for _ in range(rounds):
                        ref.start(forwards)
                        alone.append(ref.result())
                        for w in workers:
                            w.start(forwards)
                        confined.append(statistics.median(w.result() for w in workers))
                finally:
                    for w in workers:
                        w.close()
                    for g in groups:
                        g.remove()
                ratio = statistics.median(c / a for c, a in zip(confined, alone)) / f
                fits = k / f <= len(cpus)
                rows.append({"nodes": k, "F": f, "slowdown_over_F": ratio, "fits": fits})
                print(f"  {k} node(s)  F={f:<4g} slowdown/F {ratio:6.3f}"
                      + ("" if fits else f"   (quotas need {k / f:g} cores > {len(cpus)}: contention)"), flush=True)
    finally:
        ref.close()
    return rows


# ------------------------------------------------------------------ part 4
SEGMENT_F = 2.5
SEGMENT_SLICES_MS = (10.0, 2.0)
SEGMENT_MATMULS = (9, 36)  # about 3 and 12 ms of CPU here
SEGMENT_IDLES_MS = (0.0, 5.0, 60.0)  # wall: none, shorter than a period, longer than one


class _Segments:
    def __init__(self, cgroup: DeviceCgroup | None, pace: float | None = None):
        pre = cgroup.join if cgroup is not None else None
        argv = [sys.executable, "-m", "testbed.bench.segment_worker"] + (["--pace", f"{pace:.6g}"] if pace else [])
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, preexec_fn=pre,
                                     cwd=str(Path(__file__).resolve().parents[2]))
        assert self.proc.stdout.readline().strip() == "ready"

    def mean_s(self, matmuls: int, n: int, idle_ms: float) -> float:
        self.proc.stdin.write(f"{matmuls} {n} {idle_ms}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def segment_table(n: int) -> list[dict]:
    """Device time of a short compute segment after an idle gap, over its time on a free core: 1.0 is
    a device of the profile's speed; below 1, the device ran part of the segment at host speed (a CFS
    period's quota left unused while it was idle). One device of speed 1 under dilation SEGMENT_F,
    as it is (``device_over_profile``) and with its segments paced to the quota's rate
    (``paced_over_profile``: testbed.comm.trace.CpuPacer, as nodes run by default)."""
    host = DeviceProfile(speed=1.0, threads=1)
    core = allocate_cores([host], host_cpus())[0]
    free = DeviceCgroup("tbbench-segref", host, core)  # the same core, a whole one (the reference)
    free.create()
    ref = _Segments(free)
    rows = []
    try:
        for slice_ms in SEGMENT_SLICES_MS:
            g = DeviceCgroup("tbbench-seg", host.dilated(SEGMENT_F), core, slice_ms=slice_ms)
            g.create()
            quota, period = g.cpu_limit()
            w, paced = _Segments(g), _Segments(g, pace=quota / period)  # used in turn, never at once
            try:
                for k in SEGMENT_MATMULS:
                    for idle in SEGMENT_IDLES_MS:
                        alone = ref.mean_s(k, n, idle)
                        ratio = w.mean_s(k, n, idle) / SEGMENT_F / alone
                        paced_ratio = paced.mean_s(k, n, idle) / SEGMENT_F / alone
                        rows.append({"slice_ms": slice_ms, "segment_ms": alone * 1e3, "idle_ms": idle,
                                     "device_over_profile": ratio, "paced_over_profile": paced_ratio})
                        print(f"  slice {slice_ms:>4g} ms (period {slice_ms * SEGMENT_F:g} ms)  segment "
                              f"{alone * 1e3:5.1f} ms  after {idle:>4g} ms idle: device time / profile {ratio:6.3f}"
                              f", paced {paced_ratio:6.3f}", flush=True)
            finally:
                w.close()
                paced.close()
                g.remove()
    finally:
        ref.close()
        free.remove()
    return rows


# ------------------------------------------------------------------ part 5
OVERHEAD_F = 2.67  # the delay references' dilation (4 nodes of speed 1 on 1.5 of 2 cores)
OVERHEAD_BLOCKS = 10  # about 120 ms of CPU: a dozen throttles per round


class _Probe:
    def __init__(self, cgroup: DeviceCgroup):
        self.proc = subprocess.Popen([sys.executable, "-m", "testbed.bench.probe_worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, preexec_fn=cgroup.join,
                                     cwd=str(Path(__file__).resolve().parents[2]))
        assert self.proc.stdout.readline().strip() == "ready"

    def cpu_wall_s(self, n: int) -> tuple[float, float]:
        self.start(n)
        return self.result()

    def start(self, n: int) -> None:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()

    def result(self) -> tuple[float, float]:
        """CPU and wall seconds of the blocks started last."""
        cpu, wall = self.proc.stdout.readline().split()
        return float(cpu), float(wall)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def overhead_table(seconds: float) -> dict:
    """Per round, the probe block's CPU seconds under the quota of a speed-1 device at OVERHEAD_F
    over the same on a free core (the same core, a whole one), alternated; their spread."""
    host = DeviceProfile(speed=1.0, threads=1)
    core = allocate_cores([host], host_cpus())[0]
    free_g = DeviceCgroup("tbbench-ovhref", host, core)
    thr_g = DeviceCgroup("tbbench-ovh", host.dilated(OVERHEAD_F), core)
    rows: list[dict] = []
    for g in (free_g, thr_g):
        g.create()
    free, thr = None, None
    try:
        free, thr = _Probe(free_g), _Probe(thr_g)
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            f_cpu, _ = free.cpu_wall_s(OVERHEAD_BLOCKS)
            t_cpu, t_wall = thr.cpu_wall_s(OVERHEAD_BLOCKS)
            rows.append({"free_cpu_s": f_cpu, "throttled_cpu_s": t_cpu, "overhead": t_cpu / f_cpu,
                         "wall_over_cpu_at_rate": t_wall / (t_cpu * OVERHEAD_F)})
            print(f"  free {f_cpu * 1e3:6.1f} ms  throttled {t_cpu * 1e3:6.1f} ms CPU: overhead {t_cpu / f_cpu:5.3f}"
                  f"  (wall / (CPU x F) {rows[-1]['wall_over_cpu_at_rate']:5.3f})", flush=True)
    finally:
        for p in (free, thr):
            if p is not None:
                p.close()
        for g in (free_g, thr_g):
            g.remove()
    ov = sorted(r["overhead"] for r in rows)
    fr = sorted(r["free_cpu_s"] for r in rows)
    summary = {"rounds": len(rows), "overhead_min": ov[0], "overhead_median": statistics.median(ov),
               "overhead_max": ov[-1], "free_cpu_min_s": fr[0], "free_cpu_max_s": fr[-1]}
    print(f"  {len(rows)} rounds: overhead {ov[0]:.3f} / {statistics.median(ov):.3f} / {ov[-1]:.3f} (min / median / "
          f"max); free CPU {fr[0] * 1e3:.1f}-{fr[-1] * 1e3:.1f} ms", flush=True)
    return {"rows": rows, "summary": summary}


# ------------------------------------------------------------------ part 6
#: (what, tokens, runs per round): a vit-base forward split four ways at 197 tokens (a rank's share,
#: as sequence parallel and ASTRA compute it), the whole 197-token forward (``single``), and the
#: probe block (testbed.models.probe: what the nodes' device probe runs, all of them at once)
CORUN_WORK = (("vit-base", 50, 3), ("vit-base", 197, 1), ("probe", None, 10))
CORUN_DEVICES = 4


def corun_table(rounds: int, work: tuple = CORUN_WORK) -> list[dict]:
    """Per workload: CPU seconds of CORUN_DEVICES device processes computing at once (each under the
    quota of a speed-1 device at OVERHEAD_F, pinned as the runner pins them) over the same
    processes computing one at a time, alternated round by round. Above 1: what devices computing
    together on one host cost each other (shared caches, memory bandwidth), beside the quota."""
    devs = [DeviceProfile(speed=1.0, threads=1).dilated(OVERHEAD_F)] * CORUN_DEVICES
    cores = allocate_cores(devs, host_cpus())
    rows = []
    for what, tokens, runs in work:
        groups = [DeviceCgroup(f"tbbench-corun{i}", d, c) for i, (d, c) in enumerate(zip(devs, cores))]
        for g in groups:
            g.create()
        workers: list = []
        try:
            for g in groups:
                workers.append(_Probe(g) if what == "probe" else _Worker(g, what, tokens))

            def cpu(w) -> float:
                return w.result()[0] if what == "probe" else w.wall_cpu_s()[1]

            alone, together = [], []
            for _ in range(rounds):
                for w in workers:
                    w.start(runs)
                    alone.append(cpu(w))
                for w in workers:
                    w.start(runs)
                together.extend(cpu(w) for w in workers)
        finally:
            for w in workers:
                w.close()
            for g in groups:
                g.remove()
        ratio = statistics.median(together) / statistics.median(alone)
        name = what if tokens is None else f"{what}, {tokens} tokens"
        rows.append({"work": name, "alone_cpu_s": statistics.median(alone) / runs,
                     "together_cpu_s": statistics.median(together) / runs, "together_over_alone": ratio})
        print(f"  {name:22s} CPU per run alone {rows[-1]['alone_cpu_s'] * 1e3:7.1f} ms, {CORUN_DEVICES} at once "
              f"{rows[-1]['together_cpu_s'] * 1e3:7.1f} ms: {ratio:.3f}", flush=True)
    return rows


# ------------------------------------------------------------------ parts 2 and 3
def _experiment(name: str, nodes: int, sweep: dict, methods: list, reps: int, dilation) -> dict:
    return {"name": name, "model": {"name": "vit-small"}, "input": {"tokens": 197, "seed": 0}, "methods": methods,
            "nodes": {"count": nodes, "threads": 1}, "topology": "star" if nodes == 4 else
            {"name": "pair", "hosts": ["h1", "h2"], "links": [{"a": "h1", "b": "h2", "sweep": "full"}]},
            "sweep": sweep, "repetitions": reps, "warmup": 1, "backend": "mininet", "timeout_s": 600,
            "fidelity_s": 0, "emulation": {"time_dilation": dilation}}


def _run(exp: dict, tmp: Path, cpus: list[int] | None = None) -> dict:
    """Run an experiment in a subprocess (confined to ``cpus``); median latency per (label, bw, delay)."""
    import pandas as pd

    path, out = tmp / f"{exp['name']}.yaml", tmp / exp["name"]
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    argv = [sys.executable, "-m", "testbed.cli", "run", str(path), "--out", str(out), "--quiet", "--no-plots"]
    if cpus is not None:
        argv = ["taskset", "-c", ",".join(map(str, cpus))] + argv
    t0 = time.monotonic()
    subprocess.run(argv, check=True, cwd=str(Path(__file__).resolve().parents[2]))
    rows = pd.read_csv(out / "rows.csv")
    factor = json.loads((out / "manifest.json").read_text())["time_dilation"]["factor"]
    print(f"  {exp['name']}: F={factor:g}, {len(rows)} rows, {time.monotonic() - t0:.0f} s wall", flush=True)
    ok = rows[rows["status"] == "ok"]
    return {k: g["latency_s"].median() for k, g in ok.groupby(["label", "bandwidth_mbps", "delay_ms"])}


def _ratio_table(base: dict, others: dict[str, dict]) -> list[dict]:
    rows = []
    names = list(others)
    print(f"  {'method':<22} {'Mbit/s':>6} {'ms':>4} {'base s':>8} " + " ".join(f"{n:>9}" for n in names))
    for key in sorted(base):
        label, bw, delay = key
        ratios = {n: others[n].get(key, float("nan")) / base[key] for n in names}
        rows.append({"method": label, "bandwidth_mbps": bw, "delay_ms": delay, "base_s": base[key], **ratios})
        print(f"  {label:<22} {bw:>6g} {delay:>4g} {base[key]:>8.3f} " + " ".join(f"{ratios[n]:>9.3f}" for n in names))
    return rows


METHODS = ["single", "tensor_parallel", "sequence_parallel", "sequence_parallel_int8",
           {"name": "block_parallel", "params": {"n_b": 1}}, {"name": "astra", "params": {"groups": 1, "codebook_size": 256}}]


def consistency(tmp: Path, reps: int) -> list[dict]:
    sweep = {"bandwidth_mbps": [20, 100], "delay_ms": [1, 10]}
    cpus = host_cpus()[:2]
    base = _run(_experiment("undilated", 2, sweep, METHODS, reps, 1), tmp, cpus)
    others = {f"F={f}": _run(_experiment(f"dilated{f}", 2, sweep, METHODS, reps, f), tmp, cpus) for f in (2, 3)}
    return _ratio_table(base, others)


def host_independence(tmp: Path, reps: int) -> list[dict]:
    cpus = host_cpus()
    methods = ["single", "sequence_parallel", "sequence_parallel_int8",
               {"name": "astra", "params": {"groups": 1, "codebook_size": 256}}]
    sweep = {"bandwidth_mbps": [100], "delay_ms": [1]}
    two = _run(_experiment("cores2", 4, sweep, methods, reps, "auto"), tmp, cpus[:2])
    one = _run(_experiment("cores1", 4, sweep, methods, reps, "auto"), tmp, cpus[:1])
    return _ratio_table(two, {"1 core/2": one})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testbed.bench.dilation", description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="1,2,3,4,5,6", help="comma-separated parts to run (default 1,2,3,4,5,6)")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long part 5 alternates (default 60)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and repetitions")
    ap.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.dilation needs root (cgroups, Mininet)", file=sys.stderr)
        return 2
    parts = {int(p) for p in args.parts.split(",")}
    out: dict = {"host_cores": len(host_cpus())}
    print(f"host: {len(host_cpus())} cores (2 shared cores here: expect noise; ratios are side by side)")
    if 1 in parts:
        print("\n1. quota: slowdown / F of a fixed forward (vit-small, 197 tokens), k devices at once")
        out["quota"] = quota_table(rounds=3 if args.quick else 5, forwards=2)
    if 4 in parts:
        print(f"\n4. short segments after idle gaps: device time / profile at F={SEGMENT_F:g}, one device")
        out["segments"] = segment_table(n=9 if args.quick else 25)
    if 6 in parts:
        print(f"\n6. devices computing together: CPU of {CORUN_DEVICES} devices at once / one at a time "
              f"(quotas at F={OVERHEAD_F:g})")
        out["corun"] = corun_table(rounds=3 if args.quick else 7)
    if 5 in parts:
        print(f"\n5. throttling overhead over time: probe CPU under the quota at F={OVERHEAD_F:g} / on a free core")
        out["throttle_overhead"] = overhead_table(args.seconds / (3 if args.quick else 1))
    reps = 2 if args.quick else 3
    with tempfile.TemporaryDirectory(prefix="bench-dilation-") as d:
        if 2 in parts:
            print("\n2. consistency: median latency dilated / undilated (2 nodes, a dedicated core each)")
            out["consistency"] = consistency(Path(d), reps)
        if 3 in parts:
            print("\n3. host independence: median latency on 1 core / on 2 cores, F from auto (4 nodes)")
            out["host_independence"] = host_independence(Path(d), reps)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
