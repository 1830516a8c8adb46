"""The result store of one run directory: append-only rows, per-rank traces, the manifest.

Layout of a run directory::

    rows.csv        one row per repetition (COLUMNS), appended and flushed as produced
    rows.parquet    the same rows, written at the end of a run (and of a resumed run)
    traces.jsonl    per-rank schedule traces of every measured inference (for the simulator)
    manifest.json   resolved config, versions, machine, shaping mechanism, times, status
    codebooks/      astra codebooks the runner calibrated (one file per groups x codebook_size)
    plots/          PNG and SVG made by `testbed plot`
    report.html     one self-contained page: what ran, plots, comparison, fidelity, failed rows (`testbed report`)

rows.csv is the source of truth: a crash loses at most the row being written
(a torn last line is cut off when the directory is reopened). Rows are never rewritten:
a unit measured again (``testbed run --resume DIR --retry-failed``) gets a new row, and
the earlier row of the same (cell, repetition) is *superseded*. ``read_rows`` gives the
current row of every unit (what reports, plots and validation use);
``read_rows(dir, superseded=True)`` gives every row, with a boolean ``superseded`` column.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

# One row per measured repetition. Units are in the names; bytes are totals over ranks. ``faults``: the
# scheduled faults that hit the repetition (names, comma-separated; testbed.experiment.faults);
# ``fault_time_s``: device seconds from the unit's repetitions' start (the faults' time origin) to this one's.
COLUMNS = [
    "experiment", "backend", "mechanism", "time_dilation", "cell", "method", "method_params", "label", "model", "tokens", "batch",
    "nodes", "topology", "bandwidth_mbps", "delay_ms", "jitter_ms", "loss_pct", "trace", "trace_time_s",
    "repetition", "latency_s", "compute_s", "comm_s", "wait_s", "serialize_s", "critical_rank",
    "compute_s_mean", "comm_s_mean", "bytes_sent", "bytes_sent_max_rank", "bytes_on_wire",
    "agreement", "max_abs_err", "accuracy", "status", "error", "started_at", "faults", "fault_time_s",
    # added later, at the end: directories written before them keep their header (read_rows leaves them out)
    "all_reduce",  # the all-reduce algorithm that ran (ring | direct; empty for methods without one)
    "generate", "ttft_s", "tpot_median_s", "tpot_p95_s", "tokens_per_s", "generated_agreement", "rss_mib", "pss_mib",
    "retransmitted_segments",  # TCP segments the nodes retransmitted during the repetition (emulation only)
    "host_probe_s",  # this host's speed before the unit's repetitions (testbed.models.probe; nodes on this host only)
    "device_probe_s",  # the same block timed inside the nodes at once, under their quotas (median over nodes)
]
NUMERIC = ["time_dilation", "tokens", "batch", "nodes", "bandwidth_mbps", "delay_ms", "jitter_ms", "loss_pct", "trace_time_s",
           "repetition", "latency_s", "compute_s", "comm_s", "wait_s", "serialize_s", "critical_rank",
           "compute_s_mean", "comm_s_mean", "bytes_sent", "bytes_sent_max_rank", "bytes_on_wire",
           "agreement", "max_abs_err", "accuracy", "fault_time_s", "generate", "ttft_s", "tpot_median_s", "tpot_p95_s",
           "tokens_per_s", "generated_agreement", "rss_mib", "pss_mib", "retransmitted_segments",
           "host_probe_s", "device_probe_s"]
TEXT = ["error", "trace", "label", "faults", "all_reduce"]  # empty, never NaN
ROWS_CSV, ROWS_PARQUET, TRACES, MANIFEST = "rows.csv", "rows.parquet", "traces.jsonl", "manifest.json"


class ResultStore:
    """Appends rows and traces to a run directory; knows which (cell, repetition) are already recorded."""

    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rows_path, self.traces_path = self.dir / ROWS_CSV, self.dir / TRACES
        for p in (self.rows_path, self.traces_path):
            _cut_torn_line(p)
        new = not self.rows_path.exists() or self.rows_path.stat().st_size == 0
        # a directory written before columns were added keeps its header (rows of a resume fit it)
        self.columns = COLUMNS
        if not new:
            with open(self.rows_path, newline="") as f:
                self.columns = next(csv.reader(f))
        self._rows = open(self.rows_path, "a", newline="")
        self._traces = open(self.traces_path, "a")
        if new:
            self._write_line(self._rows, _csv_line(COLUMNS))

    def done(self) -> set[tuple[str, int]]:
        """(cell, repetition) of every unit already recorded."""
        return _keys(read_rows(self.dir))

    def failed(self) -> set[tuple[str, int]]:
        """(cell, repetition) of every unit whose current row is not ok."""
        df = read_rows(self.dir)
        return _keys(df[df["status"] != "ok"])

    def append(self, row: dict[str, Any], traces: list[dict] | None = None) -> None:
        """Record one row (missing columns empty) and, if given, its per-rank traces. Flushed to disk at once."""
        unknown = set(row) - set(COLUMNS)
        assert not unknown, f"columns not in COLUMNS: {unknown}"
        if traces is not None:
            key = {k: row[k] for k in ("cell", "method", "method_params", "repetition", "bandwidth_mbps",
                                       "delay_ms", "jitter_ms", "loss_pct", "trace")}
            self._write_line(self._traces, json.dumps({**key, "ranks": traces}) + "\n")
        self._write_line(self._rows, _csv_line([_cell(row.get(c)) for c in self.columns]))

    @staticmethod
    def _write_line(f, line: str) -> None:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())

    def write_parquet(self) -> Path:
        path = self.dir / ROWS_PARQUET
        tmp = path.with_suffix(".parquet.tmp")
        read_rows(self.dir, superseded=True).to_parquet(tmp, index=False)
        os.replace(tmp, path)
        return path

    def close(self) -> None:
        for f in (self._rows, self._traces):
            if not f.closed:
                f.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_rows(out_dir: str | Path, superseded: bool = False) -> pd.DataFrame:
    """The current row of every unit of a run directory (rows.csv, else rows.parquet), with typed columns.

    ``superseded=True``: every row ever written, in file order, with a boolean ``superseded`` column
    (True where a later row of the same (cell, repetition) exists).
    """
    d = Path(out_dir)
    if (d / ROWS_CSV).exists():
        df = pd.read_csv(d / ROWS_CSV, dtype={"method_params": str, "error": str, "cell": str, "trace": str,
                                              "faults": str}, keep_default_na=False, na_values=[""])
    elif (d / ROWS_PARQUET).exists():
        df = pd.read_parquet(d / ROWS_PARQUET).drop(columns=["superseded"], errors="ignore")
    else:
        df = pd.DataFrame({c: pd.Series(dtype=float if c in NUMERIC else object) for c in COLUMNS})
    for c in NUMERIC:
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    for c in TEXT:
        if c in df:
            df[c] = df[c].astype(object).fillna("")  # an all-empty column reads as float
    key = [c for c in ("cell", "repetition") if c in df]  # a hand-made table may lack them: nothing superseded
    old = df.duplicated(key, keep="last") if len(key) == 2 else pd.Series(False, index=df.index)
    if superseded:
        return df.assign(superseded=old.astype(bool))
    return df[~old].reset_index(drop=True)


def read_traces(out_dir: str | Path) -> list[dict]:
    """Traces of every current ok row: its key plus ``ranks`` (one Trace.to_dict per rank).

    Traces are written just before their row; a run stopped between the two re-measures that
    repetition on resume, so a later line for the same (cell, repetition) replaces an earlier one.
    """
    p = Path(out_dir) / TRACES
    if not p.exists():
        return []
    rows = read_rows(out_dir)
    ok = _keys(rows[rows["status"] == "ok"])
    latest: dict[tuple[str, int], dict] = {}
    for line in p.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            latest[(str(rec["cell"]), int(rec["repetition"]))] = rec
    return [rec for key, rec in latest.items() if key in ok]


def _keys(df: pd.DataFrame) -> set[tuple[str, int]]:
    return {(str(c), int(r)) for c, r in zip(df["cell"], df["repetition"])}


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (a reader never sees half a manifest)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, p)


def _csv_line(values: list) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue()


def _cell(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, str):
        return " ".join(v.split("\n"))  # one physical line per row keeps the file easy to grep and repair
    return v


def _cut_torn_line(p: Path) -> None:
    """Drop a last line left without its newline by a crash in the middle of a write."""
    if not p.exists() or p.stat().st_size == 0:
        return
    with open(p, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)
