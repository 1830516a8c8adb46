"""A run set beside the paper's way of measuring: what real sockets add to "compute + bytes/bandwidth".

ASTRA's paper (arXiv 2505.19342) estimated latency as compute time plus bytes over bandwidth.
For every method and profile of a run this prints the measured median latency, the speed-up
over ``single`` and over the best multi-device baseline, and the paper-style estimate made from
the same row: the critical rank's compute plus the busiest rank's application bytes over the
configured bandwidth. The gap between the two is what the estimate leaves out: per-block
synchronisation (L rounds of RTT), protocol framing, TCP dynamics and waiting for peers.

`python -m testbed.experiment.report RESULTS_DIR [--markdown]`
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

BASELINES = ("tensor_parallel", "sequence_parallel", "sequence_parallel_int8", "block_parallel")


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (label, bandwidth): medians over repetitions, speed-ups and the paper-style estimate."""
    ok = df[df["status"] == "ok"].copy()
    ok["estimate_s"] = ok["compute_s"] + 8 * ok["bytes_sent_max_rank"] / (ok["bandwidth_mbps"] * 1e6)
    g = ok.groupby(["bandwidth_mbps", "method", "label"], as_index=False).agg(
        latency_s=("latency_s", "median"), estimate_s=("estimate_s", "median"), compute_s=("compute_s", "median"),
        comm_s=("comm_s", "median"), mb_sent_per_rank=("bytes_sent_max_rank", lambda b: b.median() / 1e6),
        wire_over_app=("bytes_on_wire", "median"), app=("bytes_sent", "median"))
    g["wire_over_app"] = (g["wire_over_app"] / g["app"]).where(g["app"] > 0)
    g = g.drop(columns="app")
    single = g[g["method"] == "single"].set_index("bandwidth_mbps")["latency_s"]
    best = g[g["method"].isin(BASELINES)].groupby("bandwidth_mbps")["latency_s"].min()
    g["speedup_vs_single"] = single.reindex(g["bandwidth_mbps"]).to_numpy() / g["latency_s"]
    g["speedup_vs_best_baseline"] = best.reindex(g["bandwidth_mbps"]).to_numpy() / g["latency_s"]
    g["comm_share"] = g["comm_s"] / g["latency_s"]
    g["measured_over_estimate"] = g["latency_s"] / g["estimate_s"]
    return g.sort_values(["bandwidth_mbps", "method", "label"]).reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testbed.experiment.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("results_dir", type=Path)
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    a = ap.parse_args(argv)
    rows = a.results_dir / "rows.csv"
    if not rows.is_file():
        print(f"results_dir: no rows.csv in {a.results_dir}", file=sys.stderr)
        return 2
    s = summarize(pd.read_csv(rows))
    cols = ["bandwidth_mbps", "label", "latency_s", "estimate_s", "measured_over_estimate", "compute_s", "comm_share",
            "mb_sent_per_rank", "wire_over_app", "speedup_vs_single", "speedup_vs_best_baseline"]
    s = s[cols]
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
