"""The accuracy table as files: CSV (every row and column), Markdown (one line per G x K), a plot.

Pure functions of the DataFrame made by testbed.train.table.run_table; nothing is re-measured.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

# Markdown columns: (header, finetuned, naq on, dct)
_COLUMNS = [("k-means, DCT", False, None, True), ("k-means, no DCT", False, None, False),
            ("FT λ=0, DCT", True, False, True), ("FT λ=0, no DCT", True, False, False),
            ("FT+NAQ, DCT", True, True, True), ("FT+NAQ, no DCT", True, True, False)]


def _pick(df: pd.DataFrame, G: int, K: int, tuned: bool, naq: bool | None, dct: bool) -> float:
    a = df[(df.variant == "astra") & (df.groups == G) & (df.codebook_size == K) & (df.finetuned == tuned)
           & (df.dct == dct)]
    if naq is not None:
        a = a[(a.naq_lambda > 0) == naq]
    return float(a.test_acc.iloc[0]) if len(a) else float("nan")


def markdown(df: pd.DataFrame) -> str:
    """Test accuracy (%) per G x K and variant, the original and exact-SP rows above."""
    pct = lambda v: "-" if v != v else f"{100 * v:.2f}"  # noqa: E731 - NaN -> "-"
    ref = {r.variant: r.test_acc for r in df[df.variant != "astra"].itertuples()}
    lam = df[(df.variant == "astra") & (df.naq_lambda > 0)].naq_lambda
    lines = [f"Original (1 device): **{pct(ref.get('original', float('nan')))}%**; exact sequence parallel "
             f"(N={int(df.world_size.max())}): **{pct(ref.get('sequence_parallel', float('nan')))}%**. "
             f"NAQ λ = {lam.iloc[0] if len(lam) else '-'}.", "",
             "| G | K | bits/token | fp32 / ASTRA | " + " | ".join(c[0] for c in _COLUMNS) + " |",
             "|---|---|---|---|" + "---|" * len(_COLUMNS)]
    astra = df[df.variant == "astra"]
    for (G, K), grp in astra.groupby(["groups", "codebook_size"], sort=True):
        bits = int(G) * (int(K) - 1).bit_length()
        cells = [pct(_pick(df, G, K, t, n, d)) for _, t, n, d in _COLUMNS]
        lines.append(f"| {int(G)} | {int(K)} | {bits} | {grp.fp32_over_astra.iloc[0]:.0f}x | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(df: pd.DataFrame):
    """Figure: test accuracy vs G (log2 axis), one panel per K, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ks = sorted(df[df.variant == "astra"].codebook_size.dropna().unique())
    fig, axes = plt.subplots(1, len(Ks), figsize=(5 * len(Ks), 3.8), sharey=True, squeeze=False)
    ref = {r.variant: r.test_acc for r in df[df.variant != "astra"].itertuples()}
    for ax, K in zip(axes[0], Ks):
        for label, tuned, naq, dct in _COLUMNS:
            Gs = sorted(df[(df.variant == "astra") & (df.codebook_size == K)].groups.unique())
            ax.plot(Gs, [100 * _pick(df, G, K, tuned, naq, dct) for G in Gs], marker="o", label=label,
                    linestyle="-" if dct else "--")
        if "original" in ref:
            ax.axhline(100 * ref["original"], color="k", linewidth=0.8, label="original")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("groups G (bits per token = G log2 K)")
        ax.set_title(f"K = {int(K)}")
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def write(df: pd.DataFrame, out_dir: str | Path, header: str = "") -> list[Path]:
    """accuracy.csv, accuracy.md (``header`` first) and accuracy.png in ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "accuracy.csv", out / "accuracy.md", out / "accuracy.png"]
    df.to_csv(paths[0], index=False)
    paths[1].write_text((header + "\n\n" if header else "") + markdown(df))
    fig = plot(df)
    fig.savefig(paths[2], dpi=120)
    return paths
