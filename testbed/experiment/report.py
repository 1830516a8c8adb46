"""A run set beside the paper's way of measuring: what real sockets add to "compute + bytes/bandwidth".

ASTRA's paper (arXiv 2505.19342) estimated latency as compute time plus bytes over bandwidth.
For every method and configuration of a run (one line per label and combination of the swept
values: bandwidth, delay, jitter, loss, trace, and nodes, tokens or model where rows differ in them;
repetitions hit by scheduled faults apart, per set of faults that hit them)
this prints the measured median latency, the speed-up over ``single`` and over the best
multi-device baseline in the same configuration, and the paper-style estimate made from the
same row: the critical rank's compute plus the busiest rank's application bytes over the
configured bandwidth. The gap between the two is what the estimate leaves out: per-block
synchronisation (L rounds of RTT), protocol framing, TCP dynamics and waiting for peers.

`python -m testbed.experiment.report RESULTS_DIR [--markdown]`
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from testbed.experiment.store import read_rows

BASELINES = ("tensor_parallel", "sequence_parallel", "sequence_parallel_int8", "block_parallel")

#: columns of a row that say which configuration it measured -> (what it is, unit); two rows
#: that differ in any of them are never summarized together
DIMENSIONS = {
    "bandwidth_mbps": ("link bandwidth", "Mbit/s"),
    "delay_ms": ("one-way link delay", "ms"),
    "jitter_ms": ("delay jitter", "ms"),
    "loss_pct": ("packet loss", "%"),
    "trace": ("bandwidth trace", ""),
    "nodes": ("nodes", ""),
    "tokens": ("tokens", ""),
    "batch": ("batch", ""),
    "model": ("model", ""),
    "topology": ("topology", ""),
    "faults": ("scheduled faults", ""),  # a repetition hit by a fault is a configuration of its own
}


def varying(df: pd.DataFrame, dims=DIMENSIONS) -> list[str]:
    """The columns of ``dims`` that take more than one value in ``df`` (a missing value counts as one)."""
    return [c for c in dims if c in df and df[c].nunique(dropna=False) > 1]


def describe(col: str, value) -> str:
    """A dimension's value as a person reads it: "one-way link delay 5 ms", "trace 'lte'"."""
    name, unit = DIMENSIONS[col]
    if col == "trace":
        return f"trace '{value}'" if value else "fixed link profile"
    if col == "faults":
        return f"hit by {value}" if isinstance(value, str) and value else "no fault"
    if pd.isna(value):
        return f"{name} unshaped" if col == "bandwidth_mbps" else f"{name} not set"
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{name} {text}" + (f" {unit}" if unit else "")


def group_keys(df: pd.DataFrame) -> list[str]:
    """What the report groups by: bandwidth (the estimate's divisor) and every other dimension
    that varies; ``trace`` whenever any row replayed a trace."""
    traced = "trace" in df and (df["trace"].fillna("") != "").any()
    return ["bandwidth_mbps"] + [c for c in DIMENSIONS if c != "bandwidth_mbps" and
                                 (c in varying(df) or (c == "trace" and traced))]


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (``group_keys``) and label: medians over repetitions, speed-ups over
    ``single`` and the best baseline in the same configuration, and the paper-style estimate.

    A trace row's ``bandwidth_mbps`` is what the trace scheduled when it started; its estimate uses
    it, but the row is grouped by its trace alone (its bandwidth shows empty)."""
    ok = df[df["status"] == "ok"].copy()
    ok["estimate_s"] = ok["compute_s"] + 8 * ok["bytes_sent_max_rank"] / (ok["bandwidth_mbps"] * 1e6)
    for c in ("trace", "faults"):
        if c in ok:
            ok[c] = ok[c].fillna("")
    keys = group_keys(ok)
    if "trace" in keys:
        ok.loc[ok["trace"] != "", "bandwidth_mbps"] = float("nan")
    if "retransmitted_segments" not in ok:  # rows made before the column existed
        ok["retransmitted_segments"] = float("nan")
    g = ok.groupby([*keys, "method", "label"], as_index=False, dropna=False).agg(
        latency_s=("latency_s", "median"), estimate_s=("estimate_s", "median"), compute_s=("compute_s", "median"),
        comm_s=("comm_s", "median"), mb_sent_per_rank=("bytes_sent_max_rank", lambda b: b.median() / 1e6),
        wire_over_app=("bytes_on_wire", "median"), app=("bytes_sent", "median"),
        retransmits=("retransmitted_segments", "median"))
    g["wire_over_app"] = (g["wire_over_app"] / g["app"]).where(g["app"] > 0)
    g = g.drop(columns="app")
    single = g[g["method"] == "single"].groupby(keys, dropna=False, as_index=False)["latency_s"].min()
    best = g[g["method"].isin(BASELINES)].groupby(keys, dropna=False, as_index=False)["latency_s"].min()
    g = (g.merge(single.rename(columns={"latency_s": "single_s"}), on=keys, how="left")
         .merge(best.rename(columns={"latency_s": "best_baseline_s"}), on=keys, how="left"))
    g["speedup_vs_single"] = g.pop("single_s") / g["latency_s"]
    g["speedup_vs_best_baseline"] = g.pop("best_baseline_s") / g["latency_s"]
    g["comm_share"] = g["comm_s"] / g["latency_s"]
    g["measured_over_estimate"] = g["latency_s"] / g["estimate_s"]
    return g.sort_values([*keys, "method", "label"], na_position="first").reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testbed.experiment.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("results_dir", type=Path)
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    a = ap.parse_args(argv)
    rows = read_rows(a.results_dir)
    if len(rows) == 0:
        print(f"results_dir: got {str(a.results_dir)!r}; allowed: a directory with rows made by testbed run",
              file=sys.stderr)
        return 2
    s = summarize(rows)
    cols = [*(c for c in s.columns if c in DIMENSIONS), "label", "latency_s", "estimate_s", "measured_over_estimate", "compute_s", "comm_share",
            "mb_sent_per_rank", "wire_over_app", "retransmits", "speedup_vs_single", "speedup_vs_best_baseline"]
    s = s[[c for c in cols if c != "retransmits" or s[c].notna().any()]]  # counted on emulated runs only
    print(to_markdown(s) if a.markdown else s.to_string(index=False, float_format="%.3g"))
    return 0


def to_markdown(df: pd.DataFrame) -> str:
    """A Markdown table, numbers to 3 significant digits (pandas' to_markdown needs tabulate)."""
    def cell(v) -> str:
        return "" if pd.isna(v) else f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(df.columns) + " |", "|" + " --- |" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
