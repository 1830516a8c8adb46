"""`testbed calibrate` and `testbed simulate`.

    testbed calibrate EXPERIMENT.yaml [--out DIR] [--force] ...
    testbed calibrate --model vit-small --method single --method astra:'{"groups": 32}' --tokens 197 --nodes 4
    testbed simulate EXPERIMENT.yaml [--out DIR] [--tcp steady|slow_start] [--loss-mode expected|sampled]
                     [--no-overhead] [--speed 1,1,3,3] [--calibration DIR] [--no-measure]

`simulate` reads the experiment file as `testbed run` does (backend forced to sim),
writes rows.csv / rows.parquet with the runner's columns, plots, and sim.json (the
network and TCP model used, and where every compute profile came from).
Exit codes: 0 all rows ok, 1 some rows failed (recorded), 2 bad arguments (nothing written).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterator

from testbed.errors import ConfigError, check
from testbed.sim.network import LOSS_MODES, TCP_MODES, WireModel
from testbed.sim.profiles import ProfileKey
from testbed.sim.simulator import SimConfig, Simulator, speed_from_device


def _sim_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", metavar="DIR", default="results/calibration",
                   help="compute profiles directory (default results/calibration)")
    p.add_argument("--no-measure", action="store_true", help="never measure: use stored profiles or extrapolate")
    p.add_argument("--max-measure-tokens", type=int, default=1024, help="larger token counts are extrapolated")
    p.add_argument("--max-measure-nodes", type=int, default=8, help="more nodes than this are extrapolated")
    p.add_argument("--repetitions", type=int, default=3, help="calibration: measured inferences per profile")


def _config(args: argparse.Namespace, **extra: Any) -> SimConfig:
    return SimConfig(calibration_dir=args.calibration, measure_missing=not args.no_measure,
                     max_measure_tokens=args.max_measure_tokens, max_measure_nodes=args.max_measure_nodes,
                     calibration_repetitions=args.repetitions, **extra)


# ------------------------------------------------------------------ calibrate
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
        from testbed.experiment.spec import load_spec

        spec = load_spec(args.experiment, backend="sim")
        return [ProfileKey.of(spec.model.name, m.name, m.params, spec.input.tokens, spec.nodes.count,
                              spec.nodes.threads, spec.input.batch) for m in spec.methods]
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
    _sim_options(p)
    args = p.parse_args(argv)
    try:
        sim = Simulator(_config(args), log=lambda m: print(f"  {m}", flush=True))
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
    print(f"{'model':<12} {'method':<24} {'params':<28} {'T':>6} {'N':>3} {'thr':>3}  {'source':<12} "
          f"{'max rank compute_s':>18}  file")
    for k in keys:
        if args.force and sim.measurable(k):
            prof = sim.measure(k)
        else:
            prof = sim.profile(k)
            if prof.extrapolated:
                sim.store.put(prof)
        src = "extrapolated" if prof.extrapolated else "measured"
        print(f"{k.model:<12} {k.method:<24} {k.params_json:<28} {k.tokens:>6} {k.nodes:>3} {k.threads:>3}  "
              f"{src:<12} {max(prof.compute_s):>18.4f}  {sim.store.path(k)}")
    return 0


# ------------------------------------------------------------------ simulate
def spec_speeds(spec, topology, override: list[float] | None) -> list[float]:
    """Per-rank compute factors: --speed, else nodes.device.speed, else the topology hosts' device speed, else 1."""
    n = spec.nodes.count
    if override:
        check(len(override) in (1, n), "--speed", override, f"one factor or {n} (one per node)")
        return override * n if len(override) == 1 else override
    hosts = getattr(topology, "hosts", None)
    if spec.nodes.speed is None and hosts is not None and len(hosts) >= n:
        return [speed_from_device(h.device.speed) for h in hosts[:n]]
    return [speed_from_device(spec.nodes.speed)] * n


def simulate_spec(spec, sim: Simulator, speed: list[float] | None = None, todo: list | None = None
                  ) -> Iterator[dict]:
    """Rows of every (cell, method, repetition) of an ExperimentSpec, or of ``todo`` =
    [(cell, method_index, method, [repetitions])] (the runner's unit of work)."""
    from testbed.net.topology import load_topology
    from testbed.sim.network import KINDS

    topology = spec.topology if spec.topology in KINDS else load_topology(spec.topology)
    speeds = spec_speeds(spec, topology, speed)
    if todo is None:
        todo = [(c, mi, m, list(range(spec.repetitions))) for c in spec.cells() for mi, m in enumerate(spec.methods)]
    for cell, mi, m, reps in todo:
        common = dict(experiment=spec.name, cell=f"p{cell.index}/m{mi}", label=m.display)
        if cell.trace is not None:  # a bandwidth trace: not modelled (the links would change during the run)
            for r in reps:
                yield {**_row_base(spec, cell, m, r), **common, "status": "error",
                       "error": "bandwidth traces are not simulated (backend sim models fixed link profiles)"}
            continue
        for r in reps:
            rows = sim.run(model=spec.model.name, method=m.name, params=m.params, tokens=spec.input.tokens,
                           nodes=spec.nodes.count, topology=topology, profile=cell.profile, speed=speeds,
                           repetitions=1, threads=spec.nodes.threads, batch=spec.input.batch,
                           first_repetition=r, **common)
            row = rows[0]
            row["topology"] = spec.topology_name
            yield row


def _row_base(spec, cell, m, rep: int) -> dict:
    p = cell.profile
    return {"backend": "sim", "mechanism": "sim", "method": m.name, "method_params": m.params_json,
            "model": spec.model.name, "tokens": spec.input.tokens, "batch": spec.input.batch,
            "nodes": spec.nodes.count, "topology": spec.topology_name, "bandwidth_mbps": None,
            "delay_ms": p.delay_ms, "jitter_ms": p.jitter_ms, "loss_pct": p.loss_pct,
            "trace": cell.trace.name if cell.trace else "", "repetition": rep}


def _simulate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="testbed simulate", description="Run an experiment YAML on the SimPy model "
                                "(backend sim): same rows and plots as `testbed run`, compute times from "
                                "`testbed calibrate` (measured on demand).")
    p.add_argument("experiment")
    p.add_argument("--out", metavar="DIR", help="output directory (default results/<name>-sim-<YYYYmmdd-HHMMSS>)")
    p.add_argument("--tcp", choices=TCP_MODES, default="slow_start", help="TCP start-up model (default slow_start)")
    p.add_argument("--loss-mode", choices=LOSS_MODES, default="sampled", help="loss: sampled per repetition "
                   "(default) or its expected cost")
    p.add_argument("--no-overhead", action="store_true", help="payload only on the wire (the paper's model)")
    p.add_argument("--per-message-s", type=float, default=None, help="fixed cost per message, seconds (default: "
                   "the gRPC transport's, measured by `testbed calibrate --transport`, or measured now)")
    p.add_argument("--speed", type=lambda s: [float(x) for x in s.split(",")],
                   help="compute slow-down per node vs this host: one factor or N comma-separated")
    p.add_argument("--shared-cpus", type=int, help="the nodes share this many cores (as Mininet nodes on one "
                   "machine do): busy ranks' compute is stretched by busy*threads/cores")
    p.add_argument("--no-plots", action="store_true")
    _sim_options(p)
    return p


def simulate_main(argv: list[str]) -> int:
    args = _simulate_parser().parse_args(argv)
    from testbed.experiment.spec import load_spec
    from testbed.sim.network import TcpModel

    try:
        spec = load_spec(args.experiment, backend="sim")
        wire = WireModel.none() if args.no_overhead else WireModel()
        if args.per_message_s is not None:
            wire = replace(wire, per_message_s=args.per_message_s)
        explicit = args.no_overhead or args.per_message_s is not None
        config = _config(args, wire=wire if explicit else None,
                         tcp=TcpModel(mode=args.tcp, loss_mode=args.loss_mode), shared_cpus=args.shared_cpus)
        out = Path(args.out) if args.out else Path(spec.output_dir) if spec.output_dir else (
            Path("results") / f"{spec.name}-sim-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
        check(not out.exists() or not any(out.iterdir()), "--out", str(out), "a new or empty directory")
    except ConfigError as e:
        print(f"testbed simulate: error: {e}", file=sys.stderr)
        return 2
    return _write_run(spec, Simulator(config, log=lambda m: print(f"  {m}", flush=True)), out, args)


def _write_run(spec, sim: Simulator, out: Path, args: argparse.Namespace) -> int:
    from testbed.experiment.store import ResultStore, read_rows

    n = failed = 0
    with ResultStore(out) as store:
        for row in simulate_spec(spec, sim, args.speed):
            store.append(row)
            n += 1
            failed += row["status"] != "ok"
        store.write_parquet()
    meta = {"experiment": spec.to_dict(), "wire": asdict(sim.wire), "tcp": asdict(sim.config.tcp),
            "calibration_dir": sim.config.calibration_dir,
            "profiles": [{"key": asdict(k), "extrapolated": p.extrapolated, "file": str(sim.store.path(k))}
                         for k, p in sim.profiles_used().items()]}
    (out / "sim.json").write_text(json.dumps(meta, indent=1, default=str))
    df = read_rows(out)
    plots: list = []
    if not args.no_plots and len(df):
        from testbed.experiment.plots import save_all

        plots = save_all(df, out / "plots")
    print(f"testbed simulate: {n} rows ({failed} failed) in {out}")
    ok = df[df["status"] == "ok"]
    if len(ok):
        table = ok.pivot_table(index="label", columns="bandwidth_mbps", values="latency_s", aggfunc="median")
        print("median latency_s by method and bandwidth_mbps:")
        print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    if plots:
        print(f"  plots: {out / 'plots'}")
    return 0 if failed == 0 else 1
