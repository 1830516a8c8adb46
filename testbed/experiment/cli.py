"""`testbed run` and `testbed plot`.

    testbed run EXPERIMENT.yaml [--out DIR] [--backend B] [--no-plots] [--quiet]
    testbed run [EXPERIMENT.yaml] --resume DIR
    testbed plot RESULTS_DIR

Exit codes of `run`: 0 every row ok, 1 some rows failed (recorded in rows.csv),
2 bad experiment file or arguments (nothing written), 128+signal when stopped by
SIGTERM/SIGINT (what was measured is kept; `--resume DIR` goes on).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from testbed.errors import ConfigError, TestbedError
from testbed.experiment.checks import Prepared, check_spec
from testbed.experiment.spec import BACKENDS, ExperimentSpec, load_spec, parse_spec, with_output_dir


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="testbed run", description="Run an experiment: sweep link profiles, record "
                                "one row per repetition, write a manifest and plots.")
    p.add_argument("experiment", nargs="?", help="experiment YAML (optional with --resume: the stored config is used)")
    p.add_argument("--resume", metavar="DIR", help="continue a stopped run in DIR: measure only missing rows")
    p.add_argument("--out", metavar="DIR", help="output directory (default: the file's output_dir, else "
                   "results/<name>-<YYYYmmdd-HHMMSS>)")
    p.add_argument("--backend", choices=BACKENDS, help="override the file's backend")
    p.add_argument("--no-plots", action="store_true", help="do not make plots at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def resolve(args: argparse.Namespace) -> tuple[ExperimentSpec, Path, bool, Prepared]:
    """Spec, output directory, resume flag and what validation built; raises ConfigError, writes nothing."""
    def log(msg: str) -> None:
        if not args.quiet:
            print(f"testbed run: {msg}", file=sys.stderr, flush=True)

    from testbed.experiment.manifest import read_manifest

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
        spec = with_output_dir(spec, str(out.resolve()))
        return spec, out, True, check_spec(spec, codebook_dir=out / "codebooks", log=log)
    if not args.experiment:
        raise ConfigError("EXPERIMENT.yaml", None, "a path to an experiment file (or --resume DIR)")
    spec = load_spec(args.experiment, backend=args.backend)
    if args.out:
        out = Path(args.out)
    elif spec.output_dir:
        out = Path(spec.output_dir)
    else:
        out = Path("results") / f"{spec.name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and any(out.iterdir()):
        raise ConfigError("--out" if args.out else "output_dir", str(out),
                          f"a new or empty directory (to continue a run there: --resume {out})")
    return with_output_dir(spec, str(out.resolve())), out, False, check_spec(spec, log=log)


def run_main(argv: list[str]) -> int:
    args = _run_parser().parse_args(argv)
    try:
        spec, out, resume, prepared = resolve(args)
    except ConfigError as e:
        print(f"testbed run: error: {e}", file=sys.stderr)
        return 2
    from testbed.experiment.runner import Runner

    source = str(Path(args.experiment).resolve()) if args.experiment else None
    try:
        outcome = Runner(spec, out, prepared=prepared, resume=resume, source=source, progress=not args.quiet,
                         plots=not args.no_plots).run()
    except TestbedError as e:  # the run could not go on (e.g. the backend did not start); rows so far are kept
        print(f"\ntestbed run: failed: {e}\n  rows and manifest so far: {out}", file=sys.stderr)
        return 1
    _report(outcome)
    if outcome.status == "interrupted":
        return 128 + (outcome.signum or 15)
    return 0 if outcome.failed_rows == 0 else 1


def _report(o) -> None:
    d = o.out_dir
    print(f"testbed run: {o.status}: {o.rows} rows ({o.failed_rows} failed, {o.measured_now} measured now)")
    print(f"  rows:     {d / 'rows.csv'}" + (f"  (and {d / 'rows.parquet'})" if (d / 'rows.parquet').exists() else ""))
    print(f"  traces:   {d / 'traces.jsonl'}")
    print(f"  manifest: {d / 'manifest.json'}")
    if o.plots:
        print(f"  plots:    {d / 'plots'}/ ({', '.join(Path(p).name for p in o.plots if p.endswith('.png'))})")
    if o.status == "interrupted":
        print(f"  continue with: testbed run --resume {d}")


def plot_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="testbed plot", description="Make plots (PNG and SVG) from a results directory.")
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
