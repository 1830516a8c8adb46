"""Benchmark: what the emulated links' traffic costs the devices' compute on one host.

``python -m testbed.bench.interference`` (root) builds the star topology (topologies/star.yaml:
4 hosts, 100 Mbit/s and 1 ms per path) and times a fixed forward (``--model``, ``--tokens``; by
default vit-base at 50 tokens, what one of four sequence-parallel or ASTRA ranks computes of a
197-token input; 1 torch thread) in h1, pinned to one core, in CPU seconds of its thread, while
the links

- are idle;
- carry TCP between the three other hosts (iperf3 h2 -> h3, h3 -> h4, h4 -> h2);
- carry TCP into h1 (h2, h3, h4 -> h1), as a rank's links do while it receives;

phases alternated round by round, with the host's softirq CPU per second from /proc/stat. The
forward does the same work in every phase, so CPU above the idle phase's is work the traffic
made it pay for. Where the kernel does not account interrupt time apart
(CONFIG_IRQ_TIME_ACCOUNTING off, as on the reference VM), the packet processing of every
emulated link (bridges, htb, TCP) runs in softirq context on whichever core it lands and is
charged to the task it interrupts: a device's compute thread, and its CPU quota. A real device
pays for its own traffic only.

``--isolate`` runs the same phases a second time with a core kept for the network, as
``emulation.network_core`` keeps one in a run (testbed.net.emulation's ``network_cpu``): the delay
lines (real-time processes, on any core otherwise) pinned to the first core and every emulated
interface's receive processing steered to it, the forward on the last. iperf3 stands for the
other devices' processes and runs anywhere in both. Side by side, the two say how much of the
charge the kept core removes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PHASES = {"idle": [], "between the others": [("h2", "h3"), ("h3", "h4"), ("h4", "h2")],
          "into h1": [("h2", "h1"), ("h3", "h1"), ("h4", "h1")]}
FIRST_PORT = 5301


def softirq_s() -> float:
    """CPU seconds the host has spent in softirq since boot, all cores (/proc/stat, tick-sampled)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[7]) / os.sysconf("SC_CLK_TCK")


def interference_table(rounds: int = 3, forwards: int = 5, model: str = "vit-base", tokens: int = 50,
                       log=print, isolate: bool = False) -> list[dict]:
    """Per phase: median CPU seconds per forward, its ratio to the idle phase's (median, and the
    lowest and highest round's), the host's softirq CPU seconds per second, and the forward's wall
    over its CPU (time it was off its core)."""
    from testbed.net.cgroups import host_cpus
    from testbed.net.emulation import Emulation
    from testbed.net.fidelity import start_iperf_server
    from testbed.net.topology import load_topology

    cpus = host_cpus()
    core, net_core = cpus[-1], cpus[0]
    if isolate and core == net_core:
        raise RuntimeError("--isolate needs two cores: one for the forward, one for the network")
    cpu: dict[str, list[float]] = {k: [] for k in PHASES}
    wall: dict[str, list[float]] = {k: [] for k in PHASES}
    soft: dict[str, list[float]] = {k: [] for k in PHASES}
    with Emulation(load_topology(REPO / "topologies" / "star.yaml"), network_cpu=net_core if isolate else None) as em:
        worker = em.popen("h1", ["taskset", "-c", str(core), sys.executable, "-m", "testbed.bench.forward_worker",
                                 model, str(tokens)], device=False, stdin=subprocess.PIPE, text=True)
        line = worker.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"forward worker did not start: {line!r} {worker.stderr.read()[-300:]}")
        for r in range(rounds):
            for phase, pairs in PHASES.items():
                flows = []
                try:
                    for i, (src, dst) in enumerate(pairs):
                        flows.append(start_iperf_server(em, dst, port=FIRST_PORT + i))
                    for i, (src, dst) in enumerate(pairs):
                        flows.append(em.popen(src, ["iperf3", "-c", em.data_ip(dst), "-p", str(FIRST_PORT + i),
                                                    "-t", "600"], device=False))
                    if pairs:
                        time.sleep(1.0)  # past slow start
                    s0, t0 = softirq_s(), time.monotonic()
                    for _ in range(forwards):
                        worker.stdin.write("1\n")
                        worker.stdin.flush()
                        w, c = worker.stdout.readline().split()
                        cpu[phase].append(float(c))
                        wall[phase].append(float(w))
                    soft[phase].append((softirq_s() - s0) / (time.monotonic() - t0))
                finally:
                    for p in flows:
                        p.kill()
                        p.wait()
                log(f"  round {r + 1}/{rounds}, {phase:18s} CPU per forward {statistics.median(cpu[phase][-forwards:]) * 1e3:7.1f} ms")
    idle = statistics.median(cpu["idle"])
    per_round = {k: [statistics.median(v[i:i + forwards]) / idle for i in range(0, len(v), forwards)]
                 for k, v in cpu.items()}
    return [{"phase": k, "cpu_per_forward_s": statistics.median(cpu[k]),
             "cpu_over_idle": statistics.median(cpu[k]) / idle,
             "cpu_over_idle_rounds": (min(per_round[k]), max(per_round[k])),
             "wall_over_cpu": statistics.median(w / c for w, c in zip(wall[k], cpu[k])),
             "softirq_cpu_s_per_s": statistics.median(soft[k])} for k in PHASES]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testbed.bench.interference", description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the three phases (default 5)")
    ap.add_argument("--forwards", type=int, default=5, help="forwards timed per phase and round (default 5)")
    ap.add_argument("--model", default="vit-base")
    ap.add_argument("--tokens", type=int, default=50)
    ap.add_argument("--isolate", action="store_true",
                    help="then again with a core kept for the network (emulation.network_core)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.interference needs root (Mininet)", file=sys.stderr)
        return 2
    print(f"{args.model} at {args.tokens} tokens in h1 of the star (100 Mbit/s, 1 ms), pinned to one core; "
          f"{args.rounds} rounds of {args.forwards} forwards per phase")
    for isolate in (False, True) if args.isolate else (False,):
        print("a core kept for the network (delay lines, receive steering):" if isolate else "as a run has it by default:")
        rows = interference_table(args.rounds, args.forwards, args.model, args.tokens, isolate=isolate,
                                  log=lambda _msg: None)
        for r in rows:
            lo, hi = r["cpu_over_idle_rounds"]
            print(f"  {r['phase']:18s} CPU per forward {r['cpu_per_forward_s'] * 1e3:7.1f} ms = {r['cpu_over_idle']:.3f}x "
                  f"idle (rounds {lo:.2f}-{hi:.2f}); off its core {r['wall_over_cpu']:.2f}x; host softirq "
                  f"{r['softirq_cpu_s_per_s']:.3f} CPU-s/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
