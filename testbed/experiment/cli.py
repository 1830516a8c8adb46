"""`testbed run`, `testbed simulate` (its alias with ``--backend sim``) and `testbed plot`.

    testbed run EXPERIMENT.yaml [--out DIR] [--backend B] [--no-plots] [--quiet] [sim options]
    testbed run [EXPERIMENT.yaml] --resume DIR
    testbed run EXPERIMENT.yaml --shard K/N [--out DIR]   (then `testbed merge OUT DIR...`)
    testbed simulate EXPERIMENT.yaml [--out DIR] [--tcp steady|slow_start] [--loss-mode expected|sampled]
                     [--no-overhead] [--speed 1,1,3,3] [--calibration DIR] [--no-measure] ...
    testbed plot RESULTS_DIR

Sim options (``--tcp``, ``--loss-mode``, ``--no-overhead``, ``--per-message-s``, ``--speed``,
``--shared-cpus``, ``--calibration``, ``--no-measure``, ``--max-measure-tokens``,
``--max-measure-nodes``, ``--calibration-repetitions``) are the sim backend's settings
(testbed.backends.sim); another backend refuses them.

Exit codes of `run`: 0 every row ok, 1 some rows failed (recorded in rows.csv),
2 bad experiment file or arguments (nothing written), 128+signal (130 SIGINT, 143 SIGTERM,
129 SIGHUP) when stopped by a signal in any phase, from validation to the plots: one line on
stderr says what was kept (the rows measured so far, or that nothing was written) and how
to go on (`--resume DIR`).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from testbed.errors import ConfigError, TestbedError
from testbed.experiment import api
from testbed.experiment.checks import Prepared
from testbed.experiment.spec import BACKENDS, ExperimentSpec, load_spec, parse_spec, with_output_dir

#: option dest -> the sim backend's setting it fills
SIM_SETTINGS = {"tcp": "tcp", "loss_mode": "loss_mode", "no_overhead": "no_overhead", "per_message_s": "per_message_s",
                "speed": "speed", "shared_cpus": "shared_cpus", "calibration": "calibration",
                "no_measure": "measure", "max_measure_tokens": "max_measure_tokens",
                "max_measure_nodes": "max_measure_nodes", "calibration_repetitions": "calibration_repetitions"}


def sim_options(p: argparse.ArgumentParser, calibration_repetitions: str = "--calibration-repetitions") -> None:
    """The sim backend's options; none given: its defaults (testbed.backends.sim.DEFAULTS)."""
    from testbed.sim.network import LOSS_MODES, TCP_MODES

    g = p.add_argument_group("backend sim")
    g.add_argument("--tcp", choices=TCP_MODES, help="TCP start-up model (default slow_start)")
    g.add_argument("--loss-mode", choices=LOSS_MODES, help="loss: sampled per repetition (default) or its "
                   "expected cost")
    g.add_argument("--no-overhead", action="store_true", default=None, help="payload only on the wire (the "
                   "paper's model)")
    g.add_argument("--per-message-s", type=float, help="fixed cost per message, seconds (default: the gRPC "
                   "transport's, measured by `testbed calibrate --transport`, or measured now)")
    g.add_argument("--speed", type=lambda s: [float(x) for x in s.split(",")],
                   help="compute slow-down per node vs this host: one factor or N comma-separated")
    g.add_argument("--shared-cpus", type=int, help="the nodes share this many cores (as Mininet nodes on one "
                   "machine do): busy ranks' compute is stretched by busy*threads/cores")
    g.add_argument("--calibration", metavar="DIR", help="compute profiles directory (default results/calibration)")
    g.add_argument("--no-measure", action="store_false", default=None,
                   help="never measure: use stored profiles or extrapolate")
    g.add_argument("--max-measure-tokens", type=int, help="larger token counts are extrapolated (default 1024)")
    g.add_argument("--max-measure-nodes", type=int, help="more nodes than this are extrapolated (default 8)")
    g.add_argument(calibration_repetitions, dest="calibration_repetitions", type=int,
                   help="calibration: measured inferences per profile (default 3)")


def sim_settings(args: argparse.Namespace) -> dict:
    """The sim options given on the command line, as backend settings."""
    return {key: getattr(args, dest) for dest, key in SIM_SETTINGS.items() if getattr(args, dest, None) is not None}


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="testbed run", description="Run an experiment: sweep link profiles, record "
                                "one row per repetition, write a manifest and plots.")
    p.add_argument("experiment", nargs="?", help="experiment YAML (optional with --resume: the stored config is used)")
    p.add_argument("--resume", metavar="DIR", help="continue a stopped run in DIR: measure only missing rows")
    p.add_argument("--retry-failed", action="store_true", help="with --resume: measure again the units whose "
                   "latest row is an error (the error rows stay in rows.csv, marked superseded)")
    p.add_argument("--out", metavar="DIR", help="output directory (default: the file's output_dir, else "
                   "results/<name>-<YYYYmmdd-HHMMSS>)")
    p.add_argument("--backend", choices=BACKENDS, help="override the file's backend")
    p.add_argument("--shard", metavar="K/N", help="run only shard K of N (0-based: K = 0 .. N-1) of the sweep's "
                   "(cell, method) units, the same share on every machine; join the shards' directories with "
                   "`testbed merge OUT DIR...`. With --resume: the stored shard (optional, must match)")
    p.add_argument("--no-plots", action="store_true", help="do not make plots at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    sim_options(p)
    return p


def locate(args: argparse.Namespace) -> tuple[ExperimentSpec, Path, bool]:
    """Spec, output directory and resume flag; raises ConfigError, writes nothing."""
    from testbed.experiment.manifest import read_manifest

    if getattr(args, "retry_failed", False) and not args.resume:
        raise ConfigError("--retry-failed", True, "only with --resume DIR (failed units of a stopped or finished run)")
    if args.resume:
        out = Path(args.resume)
        stored = read_manifest(out).get("config")
        if stored is None:
            raise ConfigError("--resume", args.resume, "a results directory with a manifest.json made by testbed run")
        spec = load_spec(args.experiment, backend=args.backend) if args.experiment else parse_spec(
            {**stored, **({"backend": args.backend} if args.backend else {})})
        mine = {**spec.to_dict(), "output_dir": None}
        theirs = {**parse_spec(stored).to_dict(), "output_dir": None}
        if mine != theirs:
            diff = sorted(k for k in mine if mine[k] != theirs.get(k))
            raise ConfigError("--resume", args.resume, f"a run of the same experiment (differs in: {', '.join(diff)})")
        return with_output_dir(spec, str(out.resolve())), out, True
    if not args.experiment:
        raise ConfigError("EXPERIMENT.yaml", None, "a path to an experiment file (or --resume DIR)")
    spec = load_spec(args.experiment, backend=args.backend)
    out = Path(args.out) if args.out else api.default_out(spec)
    if out.exists() and any(out.iterdir()):
        raise ConfigError("--out" if args.out else "output_dir", str(out),
                          f"a new or empty directory (to continue a run there: --resume {out})")
    return with_output_dir(spec, str(out.resolve())), out, False


def resolve_shard(args: argparse.Namespace, spec: ExperimentSpec, out: Path, resume: bool):
    """The run's shard (testbed.experiment.shard.Shard, None: the whole sweep); raises ConfigError.

    A resumed run keeps the shard its manifest records; ``--shard`` given with ``--resume`` must name it."""
    from testbed.experiment.manifest import read_manifest
    from testbed.experiment.shard import Shard, parse_shard, shard_for

    shard = parse_shard(getattr(args, "shard", None))
    if resume:
        stored = read_manifest(out).get("shard")
        stored = Shard.from_dict(stored) if stored else None
        if shard is not None and shard != stored:
            raise ConfigError("--shard", str(shard), f"the shard {out} was started as ({stored or 'none: a whole run'}),"
                              " or no --shard")
        return stored
    return shard_for(spec, getattr(args, "shard", None))


def prepare(args: argparse.Namespace, spec: ExperimentSpec, out: Path, startup=None) -> Prepared:
    """check_spec with the run's codebook directory, telling about slow steps unless --quiet."""
    def log(msg: str) -> None:
        if not args.quiet:
            print(f"testbed run: {msg}", file=sys.stderr, flush=True)

    return api.check(spec, out, log=log, startup=startup)


def run_main(argv: list[str]) -> int:
    return execute(_run_parser().parse_args(argv))


def simulate_main(argv: list[str]) -> int:
    """`testbed simulate EXPERIMENT.yaml ...`: `testbed run --backend sim` under its old name."""
    p = argparse.ArgumentParser(prog="testbed simulate", description="Alias of `testbed run --backend sim`: run "
                                "an experiment YAML on the SimPy model, compute times from `testbed calibrate` "
                                "(measured on demand).")
    p.add_argument("experiment")
    p.add_argument("--out", metavar="DIR", help="output directory (default: as testbed run)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    sim_options(p, calibration_repetitions="--repetitions")
    args = p.parse_args(argv)
    args.backend, args.resume, args.retry_failed, args.shard = "sim", None, False, None
    print("testbed simulate: an alias of `testbed run --backend sim` (same rows, manifest, plots and sim.json)",
          file=sys.stderr, flush=True)
    return execute(args, "testbed simulate")


def _check_settings(backend: str, settings: dict) -> None:
    """Options of one backend given to another: named, with the backends that take them."""
    from testbed.backends import BACKENDS as REGISTRY, backend_class

    for key in settings:
        if key not in backend_class(backend).SETTINGS:
            takers = [n for n in REGISTRY if key in backend_class(n).SETTINGS]
            dest = next(d for d, k in SIM_SETTINGS.items() if k == key)
            raise ConfigError(f"--{dest.replace('_', '-')}", settings[key],
                              f"only with backend {' | '.join(takers)} (this run's backend is {backend})")


@contextmanager
def stop_signals():
    """Within the block, SIGTERM, SIGINT and SIGHUP raise the runner's Interrupted in the main thread.

    Only the first one raises: a second, while the command winds down (the backend's teardown,
    the last message), is ignored so that the clean-up is not cut short. The runner installs
    its own handlers for the sweep and puts these back afterwards, so a signal in any phase,
    validation to plots, ends as Interrupted. The previous handlers are back after the block."""
    from testbed.experiment.runner import SIGNALLED, STOP_SIGNALS, Interrupted, quiet_dropped_interrupts

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    SIGNALLED.clear()  # the runner's checks raise again what a dropped raise missed (runner.stop_if_signalled)

    def handler(signum, _frame) -> None:
        if not SIGNALLED:
            SIGNALLED.append(signum)
            raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        with quiet_dropped_interrupts():
            yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def stop_signum(e: BaseException) -> int | None:
    """The signal that ``e`` stands for (Interrupted, Ctrl-C, the emulation guard's SystemExit), else None."""
    from testbed.experiment.runner import STOP_SIGNALS, Interrupted

    if isinstance(e, Interrupted):
        return e.signum
    if isinstance(e, KeyboardInterrupt):
        return int(signal.SIGINT)
    if isinstance(e, SystemExit) and e.code in {128 + s for s in STOP_SIGNALS}:
        return int(e.code) - 128
    return None


def stopped_line(name: str, signum: int, out: Path | None) -> str:
    """The one line a stopped run ends with: what was kept and how to go on."""
    from testbed.experiment.store import read_rows

    sig = signal.Signals(signum).name
    if out is None or not (out / "manifest.json").exists():
        return f"{name}: stopped by {sig}: nothing written; start it again with the same command"
    rows = read_rows(out)
    failed = int((rows["status"] != "ok").sum()) if len(rows) else 0
    kept = f"{len(rows)} rows" + (f" ({failed} failed)" if failed else "")
    return f"{name}: stopped by {sig}: {kept} kept in {out}; continue with: testbed run --resume {out}"


def execute(args: argparse.Namespace, name: str = "testbed run") -> int:
    """Check, run and report one experiment (`testbed run` and its alias `testbed simulate`).

    A stop signal in any phase ends it with 128+signal and one line on stderr (stopped_line)."""
    where: list[Path] = []  # the output directory, once known
    with stop_signals():
        try:
            return _execute(args, name, where)
        except BaseException as e:  # noqa: BLE001 - only stop signals are handled here
            signum = stop_signum(e)
            if signum is None:
                raise
            print(stopped_line(name, signum, where[0] if where else None), file=sys.stderr, flush=True)
            return 128 + signum


def _execute(args: argparse.Namespace, name: str, where: list[Path]) -> int:
    from testbed.experiment.runner import stop_if_signalled
    from testbed.experiment.shard import parse_shard
    from testbed.experiment.startup import Startup

    startup = Startup()  # from here to the first measured inference
    settings = sim_settings(args)
    try:
        if args.backend:  # before the (slow) checks of the experiment
            _check_settings(args.backend, settings)
        shard = parse_shard(getattr(args, "shard", None))  # a bad value is refused before the (slow) checks
        spec, out, resume = locate(args)
        shard = resolve_shard(args, spec, out, resume)
        _check_settings(spec.backend, settings)
        where.append(out)
        prepared = prepare(args, spec, out, startup)
        stop_if_signalled()  # a stop signal during the checks whose raise Python dropped
    except ConfigError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    source = str(Path(args.experiment).resolve()) if args.experiment else None
    try:
        outcome = api.measure(spec, out, prepared, resume=resume, source=source, progress=not args.quiet,
                              plots=not args.no_plots, backend_settings=settings, retry_failed=args.retry_failed,
                              shard=shard)
    except TestbedError as e:  # the run could not go on (e.g. the backend did not start); rows so far are kept
        print(f"\n{name}: failed: {e}\n  rows and manifest so far: {out}", file=sys.stderr)
        return 1
    _report(outcome)
    if outcome.status == "interrupted":
        signum = outcome.signum or int(signal.SIGTERM)
        print(stopped_line(name, signum, out), file=sys.stderr, flush=True)
        return 128 + signum
    return 0 if outcome.failed_rows == 0 else 1


def _report(o) -> None:
    d = o.out_dir
    print(f"testbed run: {o.status}: {o.rows} rows ({o.failed_rows} failed, {o.measured_now} measured now)")
    print(f"  rows:     {d / 'rows.csv'}" + (f"  (and {d / 'rows.parquet'})" if (d / 'rows.parquet').exists() else ""))
    print(f"  traces:   {d / 'traces.jsonl'}")
    print(f"  manifest: {d / 'manifest.json'}")
    from testbed.experiment.manifest import read_manifest
    from testbed.experiment.startup import describe

    m = read_manifest(d)
    if m.get("shard"):
        sh = m["shard"]
        print(f"  shard:    {sh['index']}/{sh['count']} ({len(sh.get('units') or [])} of the sweep's units); join the "
              f"shards with: testbed merge OUT DIR...")
    if m.get("codebooks_made"):
        print("  codebooks: " + "; ".join(f"{k}: {v}" for k, v in m["codebooks_made"].items()))
    if m.get("startup"):
        print("  start-up: " + describe(m["startup"]))
    if float((m.get("time_dilation") or {}).get("factor") or 1) > 1:
        from testbed.experiment.store import read_rows
        from testbed.sim.emulation import measured_throttle

        throttle = measured_throttle(read_rows(d))
        if throttle is not None:
            print(f"  devices:  the probe block took {throttle:.2f}x its free CPU time inside the nodes, under their "
                  "quotas (medians over the units): what throttling added to compute")
    if o.plots:
        print(f"  plots:    {d / 'plots'}/ ({', '.join(Path(p).name for p in o.plots if p.endswith('.png'))})")
    if (d / "report.html").exists():
        print(f"  report:   {d / 'report.html'}")
    if o.status == "interrupted":
        print(f"  continue with: testbed run --resume {d}")


def plot_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="testbed plot", description="Make plots (PNG, SVG and PDF) from a results directory.")
    p.add_argument("results_dir")
    p.add_argument("--out", metavar="DIR", help="where to write them (default RESULTS_DIR/plots)")
    args = p.parse_args(argv)
    from testbed.experiment.plots import save_all
    from testbed.experiment.store import read_rows

    d = Path(args.results_dir)
    rows = read_rows(d)
    if not d.is_dir() or len(rows) == 0:
        print(f"testbed plot: error: results_dir: got {str(d)!r}; allowed: a directory with rows.csv or rows.parquet "
              "made by testbed run", file=sys.stderr)
        return 2
    paths = save_all(rows, Path(args.out) if args.out else d / "plots", _schedules(d))
    for path in paths:
        print(path)
    return 0


def _schedules(run_dir: Path) -> dict | None:
    """Bandwidth traces of the run's experiment (from its manifest) for the trace plot, if readable."""
    from testbed.experiment.manifest import read_manifest
    from testbed.experiment.topology import trace_schedules

    config = read_manifest(run_dir).get("config")
    try:
        return trace_schedules(parse_spec(config)) if config else None
    except ConfigError:  # e.g. a trace file moved since: the plot falls back to the sampled bandwidths
        return None
