"""Soak: a long mininet sweep under loss, a bandwidth trace, link-down faults and killed nodes.

``python -m testbed.bench.soak --minutes M`` (root) runs one `testbed run` as a user would, sized to
last about M minutes, with 5 % loss on every link, a looping bandwidth trace, a link-down fault in
every unit and a node server killed at random every ``--kill-every-s`` seconds (SIGKILL, from
outside). Then ``--resume --retry-failed`` measures the failed units again. It prints:

- rows: expected / written (every line of rows.csv) / ok / failed / duplicated (units with more
  than one current row) after the run and after the retry; target every unit exactly once, ok;
- leftovers after the end, against a snapshot taken before: testbed processes, network
  namespaces, links, root-namespace qdiscs and iptables rules, testbed cgroups; target none;
- resident memory growth of the runner and of the node servers within each unit (first to last
  repetition of one method on one cell, the same work repeated), units in which a node was killed
  left out (its servers restart); target under 10 %; and the runner's over the whole run.

The size is found by a short probe run first (seconds per row on this machine).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from testbed.experiment.store import read_rows

MODEL, TOKENS, NODES = "vit-small", 65, 4
METHODS = [{"name": "single"}, {"name": "sequence_parallel_int8"},
           {"name": "astra", "params": {"groups": 1, "codebook_size": 16}}]
CGROUP_ROOTS = [Path("/sys/fs/cgroup")]


def experiment(repetitions: int, faults: bool = True) -> dict:
    """The soak sweep: one lossy fixed cell and one lossy trace cell, every method, a link down per unit."""
    d = {
        "name": "soak", "model": {"name": MODEL}, "input": {"tokens": TOKENS, "seed": 0},
        "methods": METHODS, "nodes": {"count": NODES, "threads": 1}, "topology": "star",
        "sweep": {"profiles": [{"bandwidth_mbps": 50, "delay_ms": 2, "loss_pct": 5}],
                  "traces": [{"name": "50-10-50", "points": [[0, 50], [3, 10], [6, 50]], "delay_ms": 2,
                              "loss_pct": 5}]},
        "repetitions": repetitions, "warmup": 1, "backend": "mininet", "timeout_s": 60, "fidelity_s": 0,
    }
    if faults:
        d["faults"] = [{"kind": "link_down", "link": ["h2", "s1"], "at_s": 1.0, "duration_s": 0.5}]
    return d


# -- what a run leaves --------------------------------------------------------------------------
@dataclass
class Snapshot:
    processes: set[tuple[int, str]] = field(default_factory=set)
    netns: set[int] = field(default_factory=set)
    links: set[str] = field(default_factory=set)
    qdiscs: set[str] = field(default_factory=set)
    iptables: set[str] = field(default_factory=set)
    cgroups: set[str] = field(default_factory=set)

    @classmethod
    def take(cls) -> "Snapshot":
        s = cls()
        init_ns = os.stat("/proc/self/ns/net").st_ino  # the soak itself runs in the root namespace
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                ns = os.stat(p / "ns/net").st_ino
            except OSError:
                continue
            if ns != init_ns:
                s.netns.add(ns)
            if any(k in cmd for k in ("testbed.node", "testbed.net", "iperf3", "mnexec", "bash --norc")):
                s.processes.add((int(p.name), cmd[:120]))
        s.links = set(_lines(["ip", "-o", "link", "show"], lambda ln: ln.split(":")[1].strip().split("@")[0]))
        s.qdiscs = set(_lines(["tc", "qdisc", "show"]))
        s.iptables = {ln for ln in _lines(["iptables-legacy-save"]) + _lines(["iptables-save"])
                      if ln.startswith("-A")}
        for root in CGROUP_ROOTS:
            s.cgroups |= {str(d) for d in root.rglob("*") if d.is_dir() and "testbed" in d.name}
        return s

    def new_since(self, before: "Snapshot") -> dict[str, list]:
        self.processes = {p for p in self.processes if p[0] != os.getpid()}
        out = {}
        for name in ("processes", "netns", "links", "qdiscs", "iptables", "cgroups"):
            extra = sorted(getattr(self, name) - getattr(before, name), key=str)
            out[name] = extra
        return out


def _lines(argv: list[str], pick=lambda ln: ln) -> list[str]:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [pick(ln) for ln in out.splitlines() if ln.strip()]


# -- processes of the run -----------------------------------------------------------------------
def descendants(pid: int) -> list[int]:
    """Every living descendant of ``pid``."""
    parent: dict[int, int] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                parent[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        cur = todo.pop()
        kids = [c for c, pp in parent.items() if pp == cur]
        out += kids
        todo += kids
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def rss_mb(pid: int) -> float | None:
    try:
        for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1]) / 1024
    except OSError:
        return None
    return None


def node_pids(runner: int) -> list[int]:
    return [p for p in descendants(runner) if "-m testbed.node" in cmdline(p)]


@dataclass
class Memory:
    runner_mb: float | None = None
    nodes_mb: list[float] = field(default_factory=list)


def memory(runner: int) -> Memory:
    return Memory(rss_mb(runner), [m for p in node_pids(runner) if (m := rss_mb(p)) is not None])


# -- the soak ------------------------------------------------------------------------------------
def run_testbed(args: list[str], on_start=None) -> tuple[int, str, float]:
    """`testbed ARGS` as a subprocess; ``on_start(proc)`` runs in a thread while it runs."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "testbed.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    watcher = threading.Thread(target=on_start, args=(proc,), daemon=True) if on_start else None
    if watcher:
        watcher.start()
    try:
        _out, err = proc.communicate()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
        raise
    if watcher:
        watcher.join(10)
    return proc.returncode, err, time.monotonic() - t0


def seconds_per_row(work: Path, faults: bool, reps: int = 6) -> float:
    """A short probe run: wall seconds per row between the first and the last row written (node
    start-up and teardown excluded), counting the per-unit warm-up and loading in."""
    yml = work / "probe.yaml"
    yml.write_text(yaml.safe_dump(experiment(reps, faults), sort_keys=False))
    out = work / "probe"
    seen: list[tuple[float, int]] = []  # (when, rows) at each change of the row count

    def watch(proc):
        rows = out / "rows.csv"
        while proc.poll() is None:
            n = rows.read_text().count("\n") - 1 if rows.exists() else 0
            if n > 0 and (not seen or seen[-1][1] != n):
                seen.append((time.monotonic(), n))
            time.sleep(0.05)

    rc, err, _wall = run_testbed(["run", str(yml), "--out", str(out), "--quiet", "--no-plots"], watch)
    if rc not in (0, 1):
        sys.exit(f"soak: the probe run failed (exit {rc}): {err.strip().splitlines()[-1:] or err}")
    if len(seen) < 2:
        sys.exit("soak: the probe run wrote fewer than two rows")
    (t0, n0), (t1, n1) = seen[0], seen[-1]
    return max(0.05, (t1 - t0) / (n1 - n0))


@dataclass
class Sample:
    rows: int
    memory: Memory


def unit_growth(samples: list[Sample], reps: int, units: int) -> list[tuple[float, float] | None]:
    """(runner, nodes) resident-memory growth in % within each unit: from the first sample after
    its first row to the last sample before its last row, with every node up in both (a node
    killed and restarted in between makes the unit's figure None)."""
    out = []
    for u in range(units):
        lo, hi = u * reps + 1, (u + 1) * reps - 1
        inside = [s for s in samples if lo <= s.rows <= hi and s.memory.runner_mb and len(s.memory.nodes_mb) == NODES]
        if len(inside) < 2 or len({len(s.memory.nodes_mb) for s in inside}) != 1:
            out.append(None)
            continue
        a, b = inside[0].memory, inside[-1].memory
        out.append((100 * (b.runner_mb / a.runner_mb - 1), 100 * (sum(b.nodes_mb) / sum(a.nodes_mb) - 1)))
    return out


def summary(out: Path, expected: int) -> dict:
    every = read_rows(out, superseded=True)
    current = read_rows(out)
    units = list(zip(current["cell"], current["repetition"]))
    return {"expected": expected, "written": len(every), "ok": int((current["status"] == "ok").sum()),
            "failed": int((current["status"] != "ok").sum()), "duplicated": len(units) - len(set(units)),
            "missing": expected - len(set(units))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testbed.bench.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="how long the main run should last (default 30)")
    ap.add_argument("--kill-every-s", type=float, default=180.0,
                    help="kill a random node server about this often (default 180 s; 0: never)")
    ap.add_argument("--no-faults", action="store_true", help="no link-down fault in the experiment")
    ap.add_argument("--out", metavar="DIR", help="where the runs go (default: a temporary directory, removed)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("soak: needs root (it runs the mininet backend)", file=sys.stderr)
        return 2
    if args.minutes <= 0:
        print(f"soak: error: --minutes: got {args.minutes:g}; allowed: a number > 0", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="testbed-soak-")
    work = Path(args.out or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    faults = not args.no_faults
    before = Snapshot.take()

    per_row = seconds_per_row(work, faults)
    rows_per_rep = 2 * len(METHODS)  # two cells x methods
    reps = max(2, math.ceil(args.minutes * 60 / (per_row * rows_per_rep)))
    expected = reps * rows_per_rep
    print(f"soak: {per_row:.2f} s per row here; {reps} repetitions x {rows_per_rep} units = {expected} rows "
          f"planned for {args.minutes:g} min; a node killed every ~{args.kill_every_s:g} s", flush=True)
    yml = work / "soak.yaml"
    yml.write_text(yaml.safe_dump(experiment(reps, faults), sort_keys=False))
    out = work / "run"
    samples: list[Sample] = []
    kills: list[float] = []
    restarted: set[int] = set()  # units in which a node was killed (their nodes restart)

    def watch(proc):
        rows, t0 = out / "rows.csv", time.monotonic()
        next_kill = t0 + rng.uniform(0.5, 1.5) * args.kill_every_s if args.kill_every_s > 0 else math.inf
        while proc.poll() is None:
            n = rows.read_text().count("\n") - 1 if rows.exists() else 0
            samples.append(Sample(n, memory(proc.pid)))
            if time.monotonic() >= next_kill and (nodes := node_pids(proc.pid)):
                try:
                    os.kill(rng.choice(nodes), signal.SIGKILL)
                    kills.append(time.monotonic() - t0)
                    restarted.add(n // reps)
                except ProcessLookupError:
                    pass
                next_kill = time.monotonic() + rng.uniform(0.5, 1.5) * args.kill_every_s
            time.sleep(0.5)

    rc, err, wall = run_testbed(["run", str(yml), "--out", str(out), "--quiet", "--no-plots"], watch)
    after_run = summary(out, expected)
    print(f"soak: main run exit {rc} after {wall / 60:.1f} min, {len(kills)} nodes killed (at "
          f"{', '.join(f'{t:.0f}' for t in kills) or '-'} s)", flush=True)
    if rc not in (0, 1):
        print(f"soak: main run: {err.strip().splitlines()[-1] if err.strip() else '(no message)'}", flush=True)
    rc2, err2, wall2 = run_testbed(["run", "--resume", str(out), "--retry-failed", "--quiet", "--no-plots"])
    after_retry = summary(out, expected)
    time.sleep(1.0)
    left = Snapshot.take().new_since(before)

    print("\nrows          expected  written  ok  failed  duplicated  missing")
    for name, s in (("after run", after_run), ("after retry", after_retry)):
        print(f"{name:<14}{s['expected']:>8}{s['written']:>9}{s['ok']:>4}{s['failed']:>8}{s['duplicated']:>12}"
              f"{s['missing']:>9}")
    print(f"retry: exit {rc2} after {wall2:.0f} s" + (f" ({err2.strip().splitlines()[-1]})" if rc2 not in (0, 1)
                                                    and err2.strip() else ""))
    print("\nleftovers after the end (new since the start):")
    for name, items in left.items():
        print(f"  {name:<10} {len(items)}" + (f"  e.g. {items[:3]}" if items else ""))
    growth = unit_growth(samples, reps, rows_per_rep)
    print("\nresident memory growth within each unit (first to last repetition; units hit by a kill left out)")
    print("  unit   runner    nodes (sum)")
    for u, g in enumerate(growth):
        print(f"  {u:>4}   " + ("-" if g is None or u in restarted else f"{g[0]:+5.1f} %  {g[1]:+6.1f} %"))
    first = next((s.memory for s in samples if s.rows >= 1 and s.memory.runner_mb), None)
    last = next((s.memory for s in reversed(samples) if s.memory.runner_mb), None)
    if first and last:
        print(f"  runner over the whole run: {first.runner_mb:.0f} -> {last.runner_mb:.0f} MiB "
              f"({100 * (last.runner_mb / first.runner_mb - 1):+.1f} %)")
    worst = max((max(g) for u, g in enumerate(growth) if g is not None and u not in restarted), default=None)
    mem_ok = worst is not None and worst < 10
    ok = (after_retry["ok"] == expected and after_retry["duplicated"] == 0 and not any(left.values()) and mem_ok)
    print(f"\nsoak: {'every unit exactly once and ok, nothing left, memory growth under 10 %' if ok else 'TARGET MISSED (see above)'}")
    if tmp is not None:
        tmp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
