"""report.html: one self-contained page per run directory, to open in a browser.

What ran (experiment, backend, shaping mechanism, time dilation, host, git commit), the plots
(inline SVG, so the page needs no network and no other file), the paper-style comparison table
of testbed.experiment.report (every swept dimension a column of its own), the links' fidelity as
measured when each cell started, the failed rows with their errors, and links to rows.csv,
rows.parquet and manifest.json beside it. No script: nothing runs when it is opened.

The runner writes it at the end of every run; ``testbed report DIR`` writes it again (after
``testbed plot DIR``, for example).
"""

from __future__ import annotations

import argparse
import base64
import html
import sys
from pathlib import Path

import pandas as pd

from testbed.experiment.manifest import read_manifest
from testbed.experiment.report import DIMENSIONS, summarize
from testbed.experiment.store import MANIFEST, ROWS_CSV, ROWS_PARQUET, read_rows

REPORT = "report.html"
#: the comparison table's columns after the dimensions, with their headings
SUMMARY_COLUMNS = {"label": "method", "latency_s": "median latency (s)", "estimate_s": "compute + bytes/bw (s)",
                   "measured_over_estimate": "measured / estimate", "compute_s": "compute (s)",
                   "comm_share": "comm share", "mb_sent_per_rank": "MB sent (busiest rank)",
                   "wire_over_app": "wire / app bytes", "retransmits": "TCP segments retransmitted",
                   "speedup_vs_single": "speed-up vs single",
                   "speedup_vs_best_baseline": "speed-up vs best baseline"}
#: the figures plots.save_all draws, in the page's order, with what each shows (others follow by name)
PLOT_CAPTIONS = {"latency": "latency vs the swept link axis", "speedup": "speed-up over single",
                 "speedup_heatmap_single": "speed-up over single per bandwidth x delay cell",
                 "speedup_heatmap_baseline": "speed-up over the best multi-device baseline (TP, SP, SP-int8, BP) per cell",
                 "breakdown": "compute vs communication", "latency_cdf": "latency CDF under packet loss and faults",
                 "trace": "latency under a bandwidth trace", "faults": "latency over time under scheduled faults"}
FIDELITY_COLUMNS = ("src", "dst", "bandwidth_mbps", "goodput_mbps", "goodput_ratio", "delay_ms", "rtt_expected_ms",
                    "rtt_ms", "rtt_error_ms", "loss_pct", "ping_loss_pct")
FAILED_COLUMNS = ("cell", "method", "label", "repetition", *DIMENSIONS, "error")
STYLE = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em} h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0;font-size:13px} td,th{border:1px solid #ccc;padding:2px 8px}
th{background:#f3f3f3;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 16px} dt{font-weight:600}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #eee} .bad{color:#b00}
"""


def _esc(v) -> str:
    return html.escape("" if v is None else str(v))


def _cell(v) -> str:
    if isinstance(v, float):
        return '<td class="n"></td>' if pd.isna(v) else f'<td class="n">{v:.3g}</td>'
    if isinstance(v, int) and not isinstance(v, bool):
        return f'<td class="n">{v}</td>'
    return f"<td>{_esc(v)}</td>"


def table(df: pd.DataFrame, headings: dict[str, str] | None = None) -> str:
    """An HTML table of ``df`` (numbers to 3 significant digits)."""
    heads = "".join(f"<th>{_esc((headings or {}).get(c, c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in df.itertuples(index=False))
    return f"<table><thead><tr>{heads}</tr></thead><tbody>{body}</tbody></table>"


def _what_ran(m: dict) -> str:
    git, mach, b = m.get("git") or {}, m.get("machine") or {}, m.get("backend") or {}
    td = m.get("time_dilation") or {}
    config = m.get("config") or {}
    items = {
        "experiment": f"{m.get('experiment', '?')}" + (f": {config['description']}" if config.get("description") else ""),
        "status": f"{m.get('status', '?')}: {m.get('rows', '?')} rows, {m.get('failed_rows', 0)} failed",
        "backend": b.get("name"), "shaping mechanism": b.get("mechanism"),
        "time dilation": f"{td['factor']:g}x ({td.get('mode', '')})" if "factor" in td else "none recorded",
        "host": ", ".join(f"{k} {v}" for k, v in mach.items() if k in ("host", "kernel", "cpu_count", "python")),
        "git commit": f"{git.get('commit')}" + (" with uncommitted changes" if git.get("dirty") else ""),
        "started / updated": f"{m.get('created_at')} / {m.get('updated_at')}",
        "source file": m.get("source_file"),
    }
    if m.get("shard"):  # one shard of a sharded sweep (testbed run --shard K/N)
        items["shard"] = f"{m['shard'].get('index')}/{m['shard'].get('count')} ({len(m['shard'].get('units') or [])} units)"
    if m.get("shards"):  # made by testbed merge
        items["shards"] = "; ".join(f"{s.get('shard')} on {s.get('host')}" for s in m["shards"])
    return "<dl>" + "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in items.items()) + "</dl>"


def _plots(run_dir: Path) -> str:
    figs = []
    order = list(PLOT_CAPTIONS)
    for png in sorted((run_dir / "plots").glob("*.png"),
                      key=lambda p: (order.index(p.stem) if p.stem in order else len(order), p.stem)):
        svg = png.with_suffix(".svg")
        src = (f"data:image/svg+xml;base64,{base64.b64encode(svg.read_bytes()).decode()}" if svg.is_file()
               else f"data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}")
        caption = png.stem + (f": {PLOT_CAPTIONS[png.stem]}" if png.stem in PLOT_CAPTIONS else "")
        figs.append(f'<figure><img alt="{_esc(png.stem)}" src="{src}"><figcaption>{_esc(caption)} '
                    f'(<a href="plots/{_esc(png.name)}">PNG</a>' + (f', <a href="plots/{_esc(svg.name)}">SVG</a>'
                                                                   if svg.is_file() else "") + ")</figcaption></figure>")
    return "".join(figs) or "<p>No plots in plots/ (<code>testbed plot DIR</code> makes them).</p>"


def _comparison(rows: pd.DataFrame) -> str:
    if not (rows["status"] == "ok").any():
        return "<p>No successful rows.</p>"
    s = summarize(rows)
    dims = [c for c in s.columns if c in DIMENSIONS]
    cols = [c for c in SUMMARY_COLUMNS if c != "retransmits" or s[c].notna().any()]  # emulated runs count them
    s = s[[*dims, *cols]]
    return table(s, {**{d: f"{DIMENSIONS[d][0]}" + (f" ({DIMENSIONS[d][1]})" if DIMENSIONS[d][1] else "")
                        for d in dims}, **SUMMARY_COLUMNS})


def _fidelity(m: dict) -> str:
    cells = m.get("fidelity")
    if not isinstance(cells, list) or not cells:
        return f"<p>Not measured (backend {_esc((m.get('backend') or {}).get('name'))}, or fidelity_s: 0).</p>"
    recs = [{"cell": c.get("cell"), "profile": c.get("profile"), **{k: p.get(k) for k in FIDELITY_COLUMNS}}
            for c in cells for p in c.get("paths") or []]
    return table(pd.DataFrame(recs)) if recs else "<p>No paths measured.</p>"


def _failed(rows: pd.DataFrame) -> str:
    bad = rows[rows["status"] != "ok"]
    if not len(bad):
        return "<p>None: every row is ok.</p>"
    return table(bad[[c for c in FAILED_COLUMNS if c in bad]])


def render(run_dir: str | Path) -> str:
    """The page of a run directory (rows and manifest made by testbed run)."""
    d = Path(run_dir)
    m, rows = read_manifest(d), read_rows(d)
    links = " · ".join(f'<a href="{f}">{f}</a>' for f in (ROWS_CSV, ROWS_PARQUET, MANIFEST) if (d / f).exists())
    sections = [("What ran", _what_ran(m)), ("Plots", _plots(d)),
                ("Comparison (medians over repetitions; speed-ups in the same configuration)",
                 _comparison(rows) if len(rows) else "<p>No rows.</p>"),
                ("Link fidelity (measured when each cell started)", _fidelity(m)),
                (f"Failed rows ({int((rows['status'] != 'ok').sum()) if len(rows) else 0})",
                 _failed(rows) if len(rows) else "<p>No rows.</p>"),
                ("Files", f"<p>{links}</p>")]
    body = "".join(f"<h2>{_esc(t)}</h2>{s}" for t, s in sections)
    title = f"testbed run: {m.get('experiment', d.name)}"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
            f"<body><h1>{_esc(title)}</h1>{body}</body></html>\n")


def write_html(run_dir: str | Path) -> Path:
    p = Path(run_dir) / REPORT
    p.write_text(render(run_dir), encoding="utf-8")
    return p


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="testbed report", description="Write RESULTS_DIR/report.html again: one "
                                 "self-contained page (what ran, plots, comparison, fidelity, failed rows).")
    ap.add_argument("results_dir")
    a = ap.parse_args(argv)
    d = Path(a.results_dir)
    if "config" not in read_manifest(d) or not len(read_rows(d)):
        print(f"testbed report: error: results_dir: got {str(d)!r}; allowed: a directory with rows and a "
              "manifest.json made by testbed run", file=sys.stderr)
        return 2
    print(write_html(d))
    return 0
