"""`testbed merge OUT DIR...`: the run directories of a sharded sweep joined into one, as if run whole.

    testbed merge OUT SHARD_DIR... [--no-plots]

Each DIR is a run directory of ``testbed run EXP.yaml --shard K/N`` (testbed.experiment.shard),
finished. OUT (new or empty) gets:

- ``rows.csv`` / ``rows.parquet``: every shard's rows, every row kept (superseded ones too), in the
  whole sweep's unit order (testbed.experiment.shard ``unit_order``; a unit's rows in the order its
  shard wrote them, so ``read_rows`` picks the same current row as in the shard);
- ``traces.jsonl``: the shards' traces in the same order;
- ``codebooks/``: the union of the shards' codebook files;
- ``manifest.json``: the first shard's, with ``shards`` listing every shard (K/N, host, machine,
  directory, status, rows, sessions, start-up) and ``merged`` saying when, where and from what; the
  per-cell lists (fidelity, memory, faults) of all shards; ``status`` complete;
- ``shards/K/``: each shard's own manifest and the files only it has (node logs, sim.json);
- ``plots/`` and ``report.html``, made again from the merged rows (plots.save_all, htmlreport).

Refused, with one error naming the directories and what differs, before anything is written:
shards of different experiments (``experiment_digest``: the resolved spec, output directory
aside; the differing fields are named), a different shard count N, different code
(``code.source_digest``, else the git commit), different backends or shaping mechanisms, a shard
missing or given twice, a shard that did not finish (resume it first), and rows of a unit that
is not the shard's or that another shard also has.

Exit codes: 0 merged, 2 refused (nothing written).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import ConfigError, TestbedError
from testbed.experiment.manifest import machine, now_iso, read_manifest
from testbed.experiment.shard import SELECTION, Shard, cell_id, select_units, spec_config, spec_digest, sweep_units, \
    unit_order
from testbed.experiment.spec import ExperimentSpec, parse_spec
from testbed.experiment.store import MANIFEST, ROWS_CSV, ROWS_PARQUET, TRACES, ResultStore, read_rows, write_json

#: what OUT gets made from the shards' rows and traces; everything else of a shard goes to OUT/shards/K/
MERGED = {ROWS_CSV, ROWS_PARQUET, TRACES, "plots", "report.html", "codebooks"}
#: manifest lists with one entry per cell (or unit) measured, joined over the shards
PER_CELL = ("fidelity", "memory", "faults")


class MergeError(TestbedError):
    """The directories are not the shards of one sweep; the message names them and what differs."""


@dataclass
class ShardDir:
    dir: Path
    manifest: dict
    shard: Shard

    @property
    def name(self) -> str:
        return f"{self.dir} (shard {self.shard})"


def load_shards(dirs: list[str | Path]) -> list[ShardDir]:
    """The shard run directories, checked to be run directories made with --shard; raises ConfigError."""
    if not dirs:
        raise ConfigError("DIR", None, "one or more run directories made by `testbed run --shard K/N`")
    out = []
    for d in map(Path, dirs):
        m = read_manifest(d) if d.is_dir() else {}
        if "config" not in m:
            raise ConfigError("DIR", str(d), "a run directory with a manifest.json made by `testbed run --shard K/N`")
        if not m.get("shard"):
            raise MergeError(f"{d} is a whole run, not a shard (its manifest records no shard); merge only "
                             "directories of `testbed run --shard K/N`")
        out.append(ShardDir(d, m, Shard.from_dict(m["shard"])))
    return out


def _code(m: dict):
    c = m.get("code") or {}
    if c.get("source_digest"):
        return ("source", c["source_digest"])
    g = m.get("git") or {}
    return ("git", g.get("commit"), bool(g.get("dirty")))


def _describe_code(m: dict) -> str:
    c, g = m.get("code") or {}, m.get("git") or {}
    commit = g.get("commit") or "no git"
    return f"source {c.get('source_digest', '?')[:19]}, commit {commit[:12]}{' (dirty)' if g.get('dirty') else ''}"


def _same(shards: list[ShardDir], what: str, key, show) -> None:
    """Raise MergeError unless ``key(manifest)`` is equal for every shard (None: unknown, not compared)."""
    groups: dict = defaultdict(list)
    for s in shards:
        k = key(s.manifest)
        if k is not None:
            groups[json.dumps(k, sort_keys=True, default=str)].append(s)
    if len(groups) > 1:
        parts = [f"{show(g[0].manifest)}: {', '.join(s.name for s in g)}" for g in groups.values()]
        raise MergeError(f"the shards differ in {what}: " + "; ".join(parts))


def check_shards(shards: list[ShardDir]) -> ExperimentSpec:
    """Everything that makes ``shards`` the complete, disjoint shards of one sweep; raises MergeError.
    Returns the experiment."""
    first = shards[0]

    def digest(m: dict) -> str:
        return m.get("experiment_digest") or spec_digest(m["config"])

    _same(shards, "experiment (experiment_digest: the resolved spec, output directory aside)", digest,
          lambda m: f"{m['experiment']} {digest(m)[:19]}{_config_diff(m, first.manifest)}")
    _same(shards, "shard count N", lambda m: m["shard"]["count"], lambda m: f"N={m['shard']['count']}")
    _same(shards, "code version", _code, _describe_code)
    _same(shards, "backend", lambda m: (m.get("backend") or {}).get("name"),
          lambda m: f"backend {(m.get('backend') or {}).get('name')}")
    _same(shards, "shaping mechanism", lambda m: (m.get("backend") or {}).get("mechanism"),
          lambda m: f"mechanism {(m.get('backend') or {}).get('mechanism')}")
    n = first.shard.count
    by_index: dict[int, list[ShardDir]] = defaultdict(list)
    for s in shards:
        by_index[s.shard.index].append(s)
    twice = {k: v for k, v in by_index.items() if len(v) > 1}
    if twice:
        k, v = sorted(twice.items())[0]
        raise MergeError(f"shard {k}/{n} is given twice: {', '.join(str(s.dir) for s in v)}")
    missing = [k for k in range(n) if k not in by_index]
    if missing:
        raise MergeError(f"shard{'s' if len(missing) > 1 else ''} {', '.join(f'{k}/{n}' for k in missing)} "
                         f"missing: given {', '.join(s.name for s in sorted(shards, key=lambda s: s.shard.index))}")
    for s in shards:
        status = s.manifest.get("status")
        if status != "complete":
            raise MergeError(f"{s.name} did not finish (status {status}); complete it first: "
                             f"testbed run --resume {s.dir}")
    spec = parse_spec(first.manifest["config"])
    _check_units(shards, spec)
    return spec


def _config_diff(m: dict, ref: dict) -> str:
    a, b = spec_config(m["config"]), spec_config(ref["config"])
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return f" (differs from {ref['experiment']} in: {', '.join(keys)})" if keys else ""


def _check_units(shards: list[ShardDir], spec: ExperimentSpec) -> None:
    """Each shard's rows are exactly its own units' (every repetition), and no unit is in two shards."""
    units = sweep_units(spec)
    owner: dict[str, ShardDir] = {}
    for s in sorted(shards, key=lambda s: s.shard.index):
        mine = {cell_id(c, mi) for c, mi, _ in select_units(units, s.shard)}
        recorded = s.manifest["shard"].get("units")
        if recorded is not None and set(recorded) != mine:
            raise MergeError(f"{s.name} ran units {sorted(recorded)} but shard {s.shard} of this experiment is "
                             f"{sorted(mine)}: the unit selection differs (another code version?)")
        rows = read_rows(s.dir)
        keys = {(str(c), int(r)) for c, r in zip(rows["cell"], rows["repetition"])}
        cells = {c for c, _ in keys}
        for c in sorted(cells):
            if c in owner:
                raise MergeError(f"unit {c} is in two shards: {owner[c].name} and {s.name}")
            owner[c] = s
        foreign = sorted(cells - mine)
        if foreign:
            raise MergeError(f"{s.name} has rows of units that are not its own: {', '.join(foreign)}")
        want = {(c, r) for c in mine for r in range(spec.repetitions)}
        lacking = sorted(want - keys)
        if lacking:
            shown = ", ".join(f"{c} rep {r}" for c, r in lacking[:5]) + (" ..." if len(lacking) > 5 else "")
            raise MergeError(f"{s.name} lacks rows ({shown}); complete it first: testbed run --resume {s.dir}")


def merge(out: str | Path, dirs: list[str | Path], plots: bool = True) -> Path:
    """Join the shard directories ``dirs`` into ``out`` (new or empty); returns ``out``.
    Raises ConfigError or MergeError, with nothing written, if they are not one sweep's shards."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError("OUT", str(out), "a new or empty directory")
    shards = load_shards(dirs)
    if any(s.dir.resolve() == out.resolve() for s in shards):
        raise ConfigError("OUT", str(out), "a directory other than the shards'")
    spec = check_shards(shards)
    shards.sort(key=lambda s: s.shard.index)
    order = unit_order(spec)
    header = _header(shards)
    out.mkdir(parents=True, exist_ok=True)
    _write_rows(out / ROWS_CSV, header, shards, order)
    _write_traces(out / TRACES, shards, order)
    codebooks = _copy_codebooks(out, shards)
    for s in shards:
        _keep_shard_files(s, out / "shards" / str(s.shard.index))
    store = ResultStore(out)
    try:
        store.write_parquet()
    finally:
        store.close()
    rows, every = read_rows(out), read_rows(out, superseded=True)
    manifest = _manifest(shards, dirs, codebooks, out)
    manifest.update(rows=len(rows), failed_rows=int((rows["status"] != "ok").sum()) if len(rows) else 0,
                    superseded_rows=int(every["superseded"].sum()), plots=[])
    write_json(out / MANIFEST, manifest)
    if plots and len(rows):
        from testbed.experiment.plots import save_all
        from testbed.experiment.topology import trace_schedules

        try:
            schedules = trace_schedules(spec)
        except ConfigError:  # a trace file not on this machine: the plot falls back to the sampled bandwidths
            schedules = None
        manifest["plots"] = [str(p) for p in save_all(rows, out / "plots", schedules)]
        write_json(out / MANIFEST, manifest)
    if len(rows):
        from testbed.experiment.htmlreport import write_html

        write_html(out)
    return out


def _header(shards: list[ShardDir]) -> list[str]:
    headers = {}
    for s in shards:
        with open(s.dir / ROWS_CSV, newline="") as f:
            headers[s.name] = next(csv.reader(f), [])
    distinct = {tuple(h) for h in headers.values()}
    if len(distinct) > 1:
        raise MergeError("the shards' rows.csv have different columns: " + "; ".join(
            f"{name}: {len(h)} columns" for name, h in headers.items()))
    return list(next(iter(distinct)))


def _write_rows(path: Path, header: list[str], shards: list[ShardDir], order: dict[str, int]) -> None:
    records, cell = [], header.index("cell")
    for s in shards:
        with open(s.dir / ROWS_CSV, newline="") as f:
            reader = csv.reader(f)
            next(reader, None)
            records += [r for r in reader if r]
    records.sort(key=lambda r: order[r[cell]])  # stable: a unit's rows keep their shard's order
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(records)


def _write_traces(path: Path, shards: list[ShardDir], order: dict[str, int]) -> None:
    lines = []
    for s in shards:
        p = s.dir / TRACES
        if p.exists():
            lines += [ln for ln in p.read_text().splitlines() if ln.strip()]
    lines.sort(key=lambda ln: order[str(json.loads(ln)["cell"])])
    path.write_text("".join(ln + "\n" for ln in lines))


def _copy_codebooks(out: Path, shards: list[ShardDir]) -> dict[str, str]:
    """The union of the shards' codebooks/ in OUT/codebooks/; returns the merged manifest's ``codebooks``."""
    paths: dict[str, str] = {}
    for s in shards:
        src = s.dir / "codebooks"
        if src.is_dir():
            for f in sorted(src.iterdir()):
                dst = out / "codebooks" / f.name
                if not dst.exists():
                    dst.parent.mkdir(exist_ok=True)
                    (shutil.copytree if f.is_dir() else shutil.copy2)(f, dst)
        for label, p in (s.manifest.get("codebooks") or {}).items():
            paths[label] = str((out / "codebooks" / Path(p).name).resolve())
    return paths


def _keep_shard_files(s: ShardDir, dst: Path) -> None:
    """The shard's own manifest and what only it has (node logs, sim.json) under OUT/shards/K/."""
    dst.mkdir(parents=True)
    for f in sorted(s.dir.iterdir()):
        if f.name in MERGED:
            continue
        (shutil.copytree if f.is_dir() else shutil.copy2)(f, dst / f.name)


def _manifest(shards: list[ShardDir], dirs: list, codebooks: dict, out: Path) -> dict:
    ms = [s.manifest for s in shards]
    m = json.loads(json.dumps(ms[0]))  # a deep copy of the first shard's
    hosts = []
    for x in ms:
        h = (x.get("machine") or {}).get("host")
        if h not in hosts:
            hosts.append(h)
    same = {k: v for k, v in (ms[0].get("machine") or {}).items() if all((x.get("machine") or {}).get(k) == v for x in ms)}
    m["machine"] = {**same, "host": ", ".join(str(h) for h in hosts)}
    m["shard"] = None
    m["shards"] = [{"shard": str(s.shard), "index": s.shard.index, "count": s.shard.count, "dir": str(s.dir.resolve()),
                    "host": (s.manifest.get("machine") or {}).get("host"), "machine": s.manifest.get("machine"),
                    "status": s.manifest.get("status"), "rows": s.manifest.get("rows"),
                    "failed_rows": s.manifest.get("failed_rows"), "units": s.manifest["shard"].get("units"),
                    "created_at": s.manifest.get("created_at"), "updated_at": s.manifest.get("updated_at"),
                    "git": s.manifest.get("git"), "startup": s.manifest.get("startup"),
                    "files": f"shards/{s.shard.index}/"} for s in shards]
    m["sessions"] = [{**sess, "shard": str(s.shard)} for s in shards for sess in s.manifest.get("sessions", [])]
    m["created_at"] = min(x.get("created_at") or "" for x in ms) or m.get("created_at")
    m["status"] = "complete"
    m["merged"] = {"at": now_iso(), "host": machine()["host"], "from": [str(Path(d).resolve()) for d in dirs],
                   "out": str(out.resolve()), "selection": SELECTION}
    for key in PER_CELL:
        joined = [e for x in ms for e in (x.get(key) or [])]
        if joined:
            m[key] = sorted(joined, key=lambda e: e.get("cell", 0) if isinstance(e, dict) else 0)
    b = dict(m.get("backend") or {})
    b["starts"] = sum((x.get("backend") or {}).get("starts", 0) for x in ms)
    runs = [r for x in ms for r in (x.get("backend") or {}).get("emulation_runs", [])]
    if runs:
        b["emulation_runs"] = runs
    m["backend"] = b
    m.pop("startup", None)  # per shard, under shards
    m.pop("error", None)
    if codebooks:
        m["codebooks"] = codebooks
    return m


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="testbed merge", description="Join the run directories of a sharded sweep "
                                "(`testbed run EXP.yaml --shard K/N`) into one run directory: rows in the whole "
                                "sweep's order, traces, one manifest listing every shard, plots and report.html.")
    p.add_argument("out", metavar="OUT", help="the merged run directory (new or empty)")
    p.add_argument("dirs", metavar="DIR", nargs="+", help="the shards' run directories, one per shard 0/N .. N-1/N")
    p.add_argument("--no-plots", action="store_true", help="do not make plots")
    args = p.parse_args(argv)
    try:
        out = merge(args.out, args.dirs, plots=not args.no_plots)
    except (ConfigError, MergeError) as e:
        print(f"testbed merge: error: {e}", file=sys.stderr)
        return 2
    m = read_manifest(out)
    print(f"testbed merge: {len(m['shards'])} shards ({', '.join(s['shard'] + ' on ' + str(s['host']) for s in m['shards'])})"
          f" -> {out}: {m['rows']} rows ({m['failed_rows']} failed)")
    for f in (ROWS_CSV, TRACES, MANIFEST, "report.html"):
        if (out / f).exists():
            print(f"  {out / f}")
    return 0
