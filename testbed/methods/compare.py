"""`testbed compare`: all six methods on one model, in-process (ranks as threads, no network).

For each method: output agreement with ``single`` (top-1 over the batch and max abs error of the
logits), bytes each rank sent (from the trace) against the method's analytic formula, and the
compute and communication seconds of the slowest rank. ASTRA runs with k-means codebooks
fit once (as the runner does) and, as a check, with codebooks holding this input's exact
block inputs, which must reproduce ``single``. Timings here are ranks sharing this machine's cores
in one process: use them for orientation only (testbed.bench.compute pins and isolates ranks).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from testbed.comm import run_inprocess
from testbed.errors import TestbedError
from testbed.methods import METHODS, build_method, resolve_params
from testbed.methods import vq
from testbed.models import CONFIGS, build_model


def run_one(model, name: str, params: dict, world_size: int, inp: torch.Tensor, tokens: int,
            codebook_path: str | None = None) -> list[dict[str, Any]]:
    """Run one method on every rank; per rank: output, bytes (trace and analytic), seconds."""
    def body(rank, comm):
        m = build_method(name, model, params, rank, world_size, comm, tokens=tokens, codebook_path=codebook_path)
        comm.trace.start()
        out = m.forward(inp)
        comm.trace.finish()
        return {"out": out, "sent": comm.trace.bytes_sent, "analytic": m.analytic_bytes(tokens, inp.shape[0])["total"],
                "compute_s": comm.trace.compute_s, "comm_s": comm.trace.comm_s, "params": m.describe(),
                "output_rank": m.output_rank}

    return run_inprocess(world_size, body)


def _row(label: str, ranks: list[dict], ref: torch.Tensor) -> dict[str, Any]:
    out = ranks[ranks[0]["output_rank"]]["out"]
    sent, analytic = [r["sent"] for r in ranks], [r["analytic"] for r in ranks]
    return {"method": label, "params": ranks[0]["params"],
            "top1": (out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "max_abs_err": (out - ref).abs().max().item(),
            "sent_per_rank": max(sent), "analytic_per_rank": max(analytic), "bytes_match": sent == analytic,
            "compute_s": max(r["compute_s"] for r in ranks), "comm_s": max(r["comm_s"] for r in ranks), "error": ""}


def compare(model_name: str = "vit-tiny", tokens: int = 65, nodes: int = 4, batch: int = 8,
            astra_params: dict | None = None, bp_params: dict | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """One row per method (plus ASTRA with exact codebooks); a method whose params do not fit
    the model (e.g. heads not divisible by nodes) gets a row with its error."""
    model = build_model(model_name, seed=seed)
    inp = model.make_input(tokens, batch=batch, seed=seed)
    with torch.inference_mode():
        ref = model(inp)
    astra_params = dict(astra_params or {})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = _codebook_files(model, inp, tokens, astra_params, Path(tmp))
        runs = [(n, n, {"n_b": 1, **(bp_params or {})} if n == "block_parallel" else {}, None) for n in METHODS]
        # with a codebook file, G and K come from it; without one (bad params) the build reports why
        from_file = {k: v for k, v in astra_params.items() if k not in ("groups", "codebook_size")}
        runs[-1] = ("astra", "astra", from_file if files["kmeans"] else astra_params, files["kmeans"])
        runs.append(("astra[exact]", "astra", {k: v for k, v in from_file.items() if k == "dct"} if files["exact"]
                     else astra_params, files["exact"]))
        for label, name, params, path in runs:
            try:
                rows.append(_row(label, run_one(model, name, params, nodes, inp, tokens, path), ref))
            except TestbedError as e:
                rows.append({"method": label, "params": ", ".join(f"{k}={v}" for k, v in params.items()) or "-",
                             "error": str(e)})
    return rows


def _codebook_files(model, inp, tokens: int, astra_params: dict, tmp: Path) -> dict[str, str | None]:
    """k-means codebooks fit once (as the runner does), and exact ones for this input."""
    try:
        p = resolve_params("astra", astra_params, model.cfg)
        cbs = vq.fit_codebooks(model, p["groups"], p["codebook_size"], tokens, n_samples=p["calibration_samples"])
        exact = vq.exact_codebooks(model, inp, p["groups"])
    except TestbedError:
        return {"kmeans": None, "exact": None}  # the astra rows then show the parameter error
    vq.save_codebooks(tmp / "kmeans.pt", cbs, {"kind": "kmeans", "tokens": tokens})
    vq.save_codebooks(tmp / "exact.pt", exact, {"kind": "exact"})
    return {"kmeans": str(tmp / "kmeans.pt"), "exact": str(tmp / "exact.pt")}


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ["method", "params", "top-1", "max|err|", "sent B/rank", "analytic B/rank", "=", "compute s", "comm s"]
    lines = []
    for r in rows:
        if r.get("error"):
            lines.append([r["method"], r["params"], "error: " + r["error"]] + [""] * 6)
            continue
        lines.append([r["method"], r["params"], f"{r['top1']:.3f}", f"{r['max_abs_err']:.2e}", f"{r['sent_per_rank']:,}",
                      f"{r['analytic_per_rank']:,}", "yes" if r["bytes_match"] else "NO",
                      f"{r['compute_s']:.3f}", f"{r['comm_s']:.3f}"])
    w = [max(len(str(x[i])) for x in [head] + [ln for ln in lines if not ln[2].startswith("error")]) for i in range(9)]
    fmt = lambda cells: "  ".join(str(c).ljust(w[i]) if i < 2 else str(c).rjust(w[i]) for i, c in enumerate(cells))
    out = [fmt(head), "  ".join("-" * x for x in w)]
    out += ["  ".join([ln[0].ljust(w[0]), ln[1].ljust(w[1]), ln[2]]) if ln[2].startswith("error") else fmt(ln)
            for ln in lines]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="testbed compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit-tiny", choices=sorted(CONFIGS))
    ap.add_argument("--tokens", type=int, default=65, help="tokens per input (ViT: patches + CLS)")
    ap.add_argument("--nodes", type=int, default=4, help="ranks N")
    ap.add_argument("--batch", type=int, default=8, help="inputs per inference (top-1 agreement is over these)")
    ap.add_argument("--groups", type=int, default=1, help="ASTRA: G groups per token")
    ap.add_argument("--codebook-size", type=int, default=1024, help="ASTRA: K entries per codebook")
    ap.add_argument("--no-dct", action="store_true", help="ASTRA on ViT: CLS as an ordinary token")
    ap.add_argument("--n-b", type=int, default=1, help="block_parallel: blocks per group")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    astra = {"groups": a.groups, "codebook_size": a.codebook_size}
    if a.no_dct:
        astra["dct"] = False
    try:
        rows = compare(a.model, a.tokens, a.nodes, a.batch, astra, {"n_b": a.n_b}, a.seed)
    except TestbedError as e:
        print(f"testbed compare: {e}")
        return 2
    print(f"{a.model}, {a.tokens} tokens, N={a.nodes}, batch {a.batch}, in-process (threads share this machine's cores)")
    print(format_table(rows))
    return 0 if all(r.get("error") or r["bytes_match"] for r in rows) else 1
