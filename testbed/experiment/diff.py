"""`testbed diff RUN_A RUN_B`: the same cells of two runs side by side, before and after a change.

For every configuration both runs measured (the swept dimensions of testbed.experiment.report,
method and label) it prints the median latency of each run, the ratio B / A and the spread of
the repetitions: the ratio of B's first quartile to A's third (``ratio_lo``) and of B's third to
A's first (``ratio_hi``); a ratio whose range holds 1 is within the runs' own noise. Cells only
one run measured are counted. It warns first when the runs differ in what makes them
comparable: the experiment itself (its config, output directory aside), the code version (git
commit, uncommitted changes), the backend, the shaping mechanism, the time-dilation factor or
the host.

    testbed diff RUN_A RUN_B [--markdown]

Exit codes: 0 printed (warnings included), 2 a directory is not a run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from testbed.errors import ConfigError
from testbed.experiment.manifest import read_manifest
from testbed.experiment.report import DIMENSIONS, to_markdown
from testbed.experiment.store import read_rows


def _run(path: str | Path) -> tuple[pd.DataFrame, dict]:
    d = Path(path)
    m = read_manifest(d)
    rows = read_rows(d) if d.is_dir() else pd.DataFrame()
    if "config" not in m or len(rows) == 0:
        raise ConfigError("run directory", str(path), "a directory with rows and a manifest.json made by testbed run")
    return rows, m


def _facts(m: dict) -> dict[str, object]:
    """What makes two runs comparable, as their manifests record it."""
    git = m.get("git") or {}
    config = {k: v for k, v in (m.get("config") or {}).items() if k != "output_dir"}
    return {
        "experiment": config,
        "code version": (git.get("commit"), "uncommitted changes" if git.get("dirty") else "clean"),
        "backend": (m.get("backend") or {}).get("name"),
        "mechanism": (m.get("backend") or {}).get("mechanism"),
        "time dilation": (m.get("time_dilation") or {}).get("factor"),
        "host": {k: v for k, v in (m.get("machine") or {}).items() if k != "user_is_root"},
    }


def warnings(a: dict, b: dict) -> list[str]:
    """One line per way the runs of manifests ``a`` and ``b`` differ in what makes them comparable."""
    out = []
    fa, fb = _facts(a), _facts(b)
    for what in fa:
        if fa[what] == fb[what]:
            continue
        if isinstance(fa[what], dict) and isinstance(fb[what], dict):
            keys = sorted(k for k in fa[what].keys() | fb[what].keys() if fa[what].get(k) != fb[what].get(k))
            if what == "host":  # a manifest written before a key existed does not differ in it
                keys = [k for k in keys if k in fa[what] and k in fb[what]]
                if not keys:
                    continue
            detail = "; ".join(f"{k}: {fa[what].get(k)!r} -> {fb[what].get(k)!r}" for k in keys)
            out.append(f"warning: the runs differ in {what} ({detail})")
        else:
            out.append(f"warning: the runs differ in {what}: {fa[what]!r} -> {fb[what]!r}")
    return out


def _keys(a: pd.DataFrame, b: pd.DataFrame) -> list[str]:
    both = [c for c in DIMENSIONS if c in a and c in b]
    return [c for c in both if pd.concat([a[c], b[c]]).nunique(dropna=False) > 1] + ["method", "label"]


def _stats(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    ok = df[df["status"] == "ok"].copy()
    for c in ("trace", "faults"):
        if c in ok:
            ok[c] = ok[c].fillna("")
    g = ok.groupby(keys, dropna=False)["latency_s"]
    return pd.DataFrame({"median_s": g.median(), "q25_s": g.quantile(0.25), "q75_s": g.quantile(0.75),
                         "reps": g.size()})


def compare(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """One line per configuration and method measured (ok rows) in both: medians, ratio B/A and its spread."""
    keys = _keys(a, b)
    sa, sb = _stats(a, keys), _stats(b, keys)
    j = sa.merge(sb, left_index=True, right_index=True, how="inner", suffixes=("_a", "_b"))
    out = pd.DataFrame({"a_median_s": j["median_s_a"], "b_median_s": j["median_s_b"],
                        "ratio": j["median_s_b"] / j["median_s_a"],
                        "ratio_lo": j["q25_s_b"] / j["q75_s_a"], "ratio_hi": j["q75_s_b"] / j["q25_s_a"],
                        "reps_a": j["reps_a"], "reps_b": j["reps_b"]})
    return out.reset_index()


def only_in(a: pd.DataFrame, b: pd.DataFrame) -> tuple[int, int]:
    """How many configurations and methods only run A, only run B measured (ok rows)."""
    keys = _keys(a, b)
    ia, ib = set(_stats(a, keys).index), set(_stats(b, keys).index)
    return len(ia - ib), len(ib - ia)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="testbed diff", description=__doc__.split("\n\n")[0])
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = p.parse_args(argv)
    try:
        (ra, ma), (rb, mb) = _run(args.run_a), _run(args.run_b)
    except ConfigError as e:
        print(f"testbed diff: error: {e}", file=sys.stderr)
        return 2
    for line in warnings(ma, mb):
        print(line)
    table = compare(ra, rb)
    oa, ob = only_in(ra, rb)
    print(f"A: {args.run_a}\nB: {args.run_b}\n{len(table)} configurations x methods in both"
          + (f"; {oa} only in A" if oa else "") + (f"; {ob} only in B" if ob else ""))
    if len(table):
        print(to_markdown(table) if args.markdown else table.to_string(index=False, float_format="%.3g"))
        r = table["ratio"]
        print(f"ratio B/A of the medians: {r.min():.3g} to {r.max():.3g} (median {r.median():.3g}); "
              f"{int(((table['ratio_lo'] <= 1) & (table['ratio_hi'] >= 1)).sum())} of {len(table)} "
              "within the spread of their repetitions")
    return 0
