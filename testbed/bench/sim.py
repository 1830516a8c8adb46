"""Benchmark of the simulator: how fast it simulates at scale, and how close it is to emulation.

    python -m testbed.bench.sim [--model vit-base] [--nodes 256] [--tokens 8192] [--emulated RUN_DIR ...]

Part 1 (scale; target < 60 s at 256 nodes): every method at ``--nodes`` ranks and ``--tokens``
tokens over 10 link profiles (a star), then on the other topology kinds the simulator scales to
any N (``--kinds``: mesh, shared_medium by default; line replays message by message and takes long at hundreds of nodes; one profile each) and on a star of mixed devices
(every other node at half speed, ``--slow-every``), each timed. Traces for that many ranks cannot be measured
here, so they are synthesized: each method's communication pattern
(testbed.sim.synth, the same messages the methods send) with compute segments from
the fit on profiles measured on this host at small sizes (testbed.sim.extrapolate).
The model keeps ``--model``'s dimensions but gets ``--heads`` heads (default = nodes)
so that tensor and block parallelism can split over all ranks (the real vit-base has
12). Calibration is measured once and cached in ``--calibration``; it is timed apart.

Part 2 (fidelity; target median |error| <= 5% and p90 <= 15% per run): for each ``--emulated`` results
directory of `testbed run` (e.g. the quickstart grid on Mininet), every cell is
predicted and compared (testbed.sim.validate) on the topology in the run's manifest (inline
topologies included); the table and plot go to RUN_DIR/validation/. Without ``--emulated`` this
part is skipped with a message.

Bad input ends with one line and exit 2; Ctrl-C with one line and exit 130 (the calibration
measured so far stays cached).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

from testbed.errors import ConfigError
from testbed.models import get_config
from testbed.net.profile import LinkProfile
from testbed.sim.engine import ENGINES, Schedule, simulate
from testbed.sim.extrapolate import Fit, fill
from testbed.sim.network import Network, SimTopology
from testbed.sim.profiles import ProfileKey
from testbed.sim.simulator import SimConfig, Simulator
from testbed.sim.synth import METHOD_NAMES, skeleton

PROFILES = [LinkProfile(bw, d) for bw in (10, 20, 50, 100, 500) for d in (1.0, 10.0)]  # 10 profiles
BASIS_TOKENS, BASIS_NODES = (65, 129, 257), (2, 4)


def calibrate(sim: Simulator, model: str, tokens: tuple[int, ...]) -> tuple[dict[str, Fit], float]:
    """Measured profiles at small sizes (cached) and the per-method fits; returns (fits, seconds)."""
    t0 = time.perf_counter()
    fits = {}
    for m in METHOD_NAMES:
        keys = [ProfileKey.of(model, m, {}, t, n) for t in tokens for n in BASIS_NODES]
        fits[m] = Fit([sim.profile(k) for k in keys])
    return fits, time.perf_counter() - t0


def scale_part(args: argparse.Namespace, sim: Simulator) -> None:
    base = get_config(args.model)
    cfg = replace(base, n_heads=args.heads or args.nodes)
    print(f"[scale] {args.model} dims (D={cfg.dim}, L={cfg.n_layers}) with {cfg.n_heads} heads, "
          f"{args.nodes} nodes, {args.tokens} tokens, {len(PROFILES)} link profiles (star), all six methods")
    fits, t_cal = calibrate(sim, args.model, tuple(args.basis_tokens))
    print(f"[scale] compute fits from {len(args.basis_tokens) * len(BASIS_NODES)} measured profiles per method "
          f"(T={args.basis_tokens}, N={list(BASIS_NODES)}): {t_cal:.1f} s (cached in {sim.config.calibration_dir})")
    t_start = time.perf_counter()
    scheds, t_synth = {}, {}
    for m in METHOD_NAMES:
        t0 = time.perf_counter()
        scheds[m] = Schedule.from_traces(fill(skeleton(cfg, m, {}, args.tokens, args.nodes), fits[m]))
        t_synth[m] = time.perf_counter() - t0
    t_replay = {m: 0.0 for m in METHOD_NAMES}
    lat: dict[str, list[float]] = {m: [] for m in METHOD_NAMES}
    msgs = {m: 0 for m in METHOD_NAMES}
    t_net = 0.0
    for prof in PROFILES:
        t0 = time.perf_counter()
        net = Network(SimTopology("star", args.nodes, prof))  # shared by the methods, as in a sweep
        t_net += time.perf_counter() - t0
        for m in METHOD_NAMES:
            t0 = time.perf_counter()
            res = simulate(scheds[m], net, sim.wire, sim.config.tcp, engine=args.engine)
            t_replay[m] += time.perf_counter() - t0
            lat[m].append(res.latency_s)
            msgs[m] += res.messages
    total = time.perf_counter() - t_start
    head = " ".join(f"{p.bandwidth_mbps:>4g}/{p.delay_ms:<3g}" for p in PROFILES)
    print(f"  {'method':<24} {'synth_s':>7} {'replay_s':>8} {'messages':>10}   latency_s per Mbit/s / ms: {head}")
    for m in METHOD_NAMES:
        print(f"  {m:<24} {t_synth[m]:7.2f} {t_replay[m]:8.2f} {msgs[m]:>10}   " + " ".join(f"{x:8.2f}" for x in lat[m]))
    verdict = "meets" if total < args.target_s else "MISSES"
    print(f"[scale] simulate {args.nodes} nodes x {len(PROFILES)} profiles x {len(METHOD_NAMES)} methods at "
          f"{args.tokens} tokens, engine {args.engine}: {total:.2f} s (synthesize+compile {sum(t_synth.values()):.2f} s, "
          f"networks {t_net:.2f} s, replay {sum(t_replay.values()):.2f} s); target < {args.target_s:g} s: {verdict}")
    prof = LinkProfile(100, 1.0)
    for kind in [k for k in args.kinds.split(",") if k]:
        t0 = time.perf_counter()
        net = Network(SimTopology(kind, args.nodes, prof))
        res = {m: simulate(scheds[m], net, sim.wire, sim.config.tcp, engine=args.engine).latency_s
               for m in METHOD_NAMES}
        print(f"[scale] {kind}, {args.nodes} nodes, 100 Mbit/s 1 ms, six methods: {time.perf_counter() - t0:.2f} s; "
              + ", ".join(f"{m} {x:.3g} s" for m, x in res.items()))
    if args.slow_every:
        speeds = [2.0 if r % args.slow_every == args.slow_every - 1 else 1.0 for r in range(args.nodes)]
        t0 = time.perf_counter()
        net = Network(SimTopology("star", args.nodes, prof))
        mixed = {m: simulate(scheds[m], net, sim.wire, sim.config.tcp, speeds, engine=args.engine).latency_s
                 for m in METHOD_NAMES}
        even = {m: simulate(scheds[m], net, sim.wire, sim.config.tcp, engine=args.engine).latency_s
                for m in METHOD_NAMES}
        print(f"[scale] star of mixed devices ({sum(s > 1 for s in speeds)} of {args.nodes} at half speed), "
              f"100 Mbit/s 1 ms: {time.perf_counter() - t0:.2f} s for both; latency mixed / all full speed: "
              + ", ".join(f"{m} {mixed[m] / even[m]:.2f}" for m in METHOD_NAMES))


def fidelity_part(args: argparse.Namespace, sim: Simulator) -> None:
    if not args.emulated:
        print("[fidelity] skipped: no emulated results given. Run the quickstart grid on Mininet "
              "(sudo make run, or testbed run experiments/quickstart.yaml) and pass its results "
              "directory with --emulated RUN_DIR.")
        return
    from testbed.experiment.report import varying
    from testbed.experiment.validation import validate_run
    from testbed.sim.validate import summary

    from testbed.experiment.validation import emulation_cpus, run_emulation
    from testbed.sim.emulation import EmulationModel

    for run_dir in args.emulated:
        emu = run_emulation(run_dir)
        if args.emulation == "contention":  # the model before dilation was read: contention on the host's cores
            cpus = emulation_cpus(run_dir) or os.cpu_count()
            emu = EmulationModel(emu.time_dilation, None, cpus, 1.0, f"contention on {cpus} cores (manifest ignored)")
        elif args.emulation == "no-jitter":
            emu = replace(emu, segment_jitter_k=0.0, why=emu.why + " (jitter off)")
        elif args.emulation == "no-dispatch":
            emu = replace(emu, dispatch_s=0.0, why=emu.why + " (dispatch off)")
        elif args.emulation == "none":
            emu = EmulationModel(emu.time_dilation, None, None, 1.0, "compute as calibrated (manifest ignored)")
        print(f"[fidelity] {run_dir}: {emu.why}")
        table, paths = validate_run(run_dir, sim, emulation=emu)
        s = summary(table)
        verdict = "meets" if s["median_abs_error_pct"] <= 5 and s["p90_abs_error_pct"] <= 15 else "MISSES"
        print(f"[fidelity] {run_dir}: {s['predicted']}/{s['cells']} cells predicted; median |error| "
              f"{s['median_abs_error_pct']:.1f}% (p90 {s['p90_abs_error_pct']:.1f}%; emulated traces replayed: "
              f"{s['replay_median_abs_error_pct']:.1f}%); target median <= 5%, p90 <= 15%: {verdict}; the "
              f"reference's own spread: repetitions {s['repetition_spread_pct']:.1f}%, single across cells "
              f"{s['single_spread_pct']:.1f}%")
        dims = ["bandwidth_mbps", *(c for c in varying(table) if c != "bandwidth_mbps")]  # one line per cell
        cols = ["label", *dims, "measured_latency_s", "predicted_latency_s", "replayed_latency_s", "error_pct"]
        print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        failed = table[table["sim_status"] != "ok"]
        for error, n in failed["sim_error"].value_counts().items():
            print(f"[fidelity] {n} cell(s) not predicted: {error}")
        print(f"[fidelity] table and plot: {', '.join(str(p) for p in paths)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.bench.sim", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit-base")
    p.add_argument("--nodes", type=int, default=256)
    p.add_argument("--target-s", type=float, default=60.0, help="scale part's time target (default 60 s)")
    p.add_argument("--kinds", default="mesh,shared_medium", help="other topology kinds simulated at --nodes (line: SimPy replay, slow at hundreds of nodes) "
                   "(comma-separated; empty: none)")
    p.add_argument("--slow-every", type=int, default=2, help="mixed devices: every k-th node at half speed (0: skip)")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--heads", type=int, default=None, help="heads of the scaled model (default: --nodes)")
    p.add_argument("--basis-tokens", type=int, nargs="+", default=list(BASIS_TOKENS))
    p.add_argument("--calibration", default="results/calibration")
    p.add_argument("--emulated", nargs="*", default=[], metavar="RUN_DIR")
    p.add_argument("--skip-scale", action="store_true")
    p.add_argument("--emulation", choices=("manifest", "no-jitter", "no-dispatch", "contention", "none"),
                   default="manifest",
                   help="fidelity: how the emulated devices computed: as the run's manifest says (dilation, "
                        "throttling, contention, segment jitter, dispatch; default), the "
                        "same without jitter or without dispatch, contention on the host's "
                        "cores whatever the manifest says, or compute as calibrated")
    p.add_argument("--engine", choices=ENGINES, default="auto", help="replay engine (auto: lockstep where it applies)")
    args = p.parse_args(argv)
    try:
        return run(args)
    except ConfigError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{p.prog}: stopped by SIGINT; calibration measured so far is kept in {args.calibration}, "
              "validation tables of the run directories finished are kept", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    sim = Simulator(SimConfig(calibration_dir=args.calibration, calibration_repetitions=2),
                    log=lambda m: print(f"  {m}", flush=True))
    print(f"host: {os.cpu_count()} cpus; simulator: SimPy, {sim.config.tcp.mode} TCP, {sim.config.tcp.loss_mode} loss")
    if not args.skip_scale:
        scale_part(args, sim)
    fidelity_part(args, sim)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
