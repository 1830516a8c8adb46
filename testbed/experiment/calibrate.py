"""`testbed calibrate`: compute profiles of this host for the simulator (the sim backend's calibration).

    testbed calibrate EXPERIMENT.yaml [--force] [--transport] [--calibration DIR] ...
    testbed calibrate --model vit-small --method single --method astra:'{"groups": 32}' --tokens 197 --nodes 4

Exit codes: 0 done, 2 bad arguments (nothing measured), 130 stopped by SIGINT.
"""

from __future__ import annotations

import argparse
import json
import sys

from testbed.backends.sim import sim_config
from testbed.errors import ConfigError, check
from testbed.experiment.spec import load_spec
from testbed.sim.profiles import ProfileKey
from testbed.sim.simulator import Simulator


def _settings(args: argparse.Namespace) -> dict:
    return {"calibration": args.calibration, "measure": not args.no_measure,
            "max_measure_tokens": args.max_measure_tokens, "max_measure_nodes": args.max_measure_nodes,
            "calibration_repetitions": args.repetitions}


def _method_arg(text: str) -> tuple[str, dict]:
    """NAME or NAME:JSON_PARAMS."""
    name, _, params = text.partition(":")
    try:
        parsed = json.loads(params) if params else {}
    except json.JSONDecodeError:
        raise ConfigError("--method", text, 'NAME or NAME:{"param": value} (JSON)') from None
    check(isinstance(parsed, dict), "--method", text, 'NAME or NAME:{"param": value} (JSON)')
    return name, parsed


def _calibration_keys(args: argparse.Namespace) -> list[ProfileKey]:
    if args.experiment:
        spec = load_spec(args.experiment, backend="sim")
        T, N, B = spec.input.tokens, spec.nodes.count, spec.input.batch
        # params as the run settles them for its topology and each cell's links (e.g. the all-reduce), so the
        # run finds these profiles; one key per distinct outcome, in the methods' order
        keys = [ProfileKey.of(spec.model.name, m.name, Simulator.settle(spec.model.name, m.name, m.params, T, N, B,
                                                                        spec.topology, c.profile),
                              T, N, spec.nodes.threads, B) for m in spec.methods for c in spec.cells()]
        return list(dict.fromkeys(keys))
    check(bool(args.model), "--model", args.model, "a model name (or give an EXPERIMENT.yaml)")
    methods = [_method_arg(m) for m in (args.method or ["single"])]
    return [ProfileKey.of(args.model, name, params, t, n, args.threads, args.batch)
            for name, params in methods for t in (args.tokens or [197]) for n in (args.nodes or [4])]


def calibrate_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="testbed calibrate", description="Measure compute profiles on this host "
                                "(per model, method, params, tokens, nodes, threads) for the simulator. Sizes "
                                "too large to measure are extrapolated from measured ones and marked so.")
    p.add_argument("experiment", nargs="?", help="experiment YAML: calibrate every method of it")
    p.add_argument("--model", help="model name (without an experiment file)")
    p.add_argument("--method", action="append", metavar="NAME[:JSON]", help="method and params; repeatable")
    p.add_argument("--tokens", type=int, nargs="+", help="token counts (default 197)")
    p.add_argument("--nodes", type=int, nargs="+", help="node counts (default 4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--force", action="store_true", help="measure again even if stored")
    p.add_argument("--transport", action="store_true", help="also measure the gRPC transport's per-message cost")
    p.add_argument("--calibration", metavar="DIR", default="results/calibration",
                   help="compute profiles directory (default results/calibration)")
    p.add_argument("--no-measure", action="store_true", help="never measure: use stored profiles or extrapolate")
    p.add_argument("--max-measure-tokens", type=int, default=1024, help="larger token counts are extrapolated")
    p.add_argument("--max-measure-nodes", type=int, default=8, help="more nodes than this are extrapolated")
    p.add_argument("--repetitions", type=int, default=3, help="measured inferences per profile")
    args = p.parse_args(argv)
    try:
        sim = Simulator(sim_config(_settings(args)), log=lambda m: print(f"  {m}", flush=True))
        keys = _calibration_keys(args) if (args.experiment or args.model or not args.transport) else []
        for k in keys:
            from testbed.sim.synth import skeleton

            skeleton(k.model, k.method, k.params, k.tokens, k.nodes, k.batch)  # all valid before any work
    except ConfigError as e:
        print(f"testbed calibrate: error: {e}", file=sys.stderr)
        return 2
    if args.transport:
        from testbed.sim.calibrate import measure_transport

        path = sim.store.put_transport(measure_transport())
        t = sim.store.transport()
        print(f"transport: {t['per_message_s'] * 1e6:.0f} us per message one way, "
              f"{t['bulk_bytes_per_s'] * 8 / 1e9:.2f} Gbit/s bulk on loopback -> {path}")
        if not keys:
            return 0
    todo = [k for k in keys if (sim.measurable(k) if args.force else sim.wants_measuring(k))]
    try:
        if todo:  # measured together: their repetitions interleave (Simulator.measure_many)
            sim.measure_many(todo)
    except KeyboardInterrupt:
        print(f"testbed calibrate: stopped by SIGINT; profiles measured together are stored only when all of them "
              f"are done: {args.calibration} keeps what was stored before", file=sys.stderr)
        return 130
    print(f"{'model':<12} {'method':<24} {'params':<28} {'T':>6} {'N':>3} {'thr':>3}  {'source':<12} "
          f"{'max rank compute_s':>18}  file")
    for k in keys:
        prof = sim.profile(k)
        if prof.extrapolated:
            sim.store.put(prof)
        src = "extrapolated" if prof.extrapolated else "measured"
        print(f"{k.model:<12} {k.method:<24} {k.params_json:<28} {k.tokens:>6} {k.nodes:>3} {k.threads:>3}  "
              f"{src:<12} {max(prof.compute_s):>18.4f}  {sim.store.path(k)}")
    return 0
