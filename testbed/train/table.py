"""The accuracy study: train once, fine-tune every ASTRA variant, evaluate all through the node runtime.

Rows (test split, N=4 in-process ranks unless stated):
- ``original``: the trained model on one rank (method ``single``);
- ``sequence_parallel``: exact SP over N ranks (full-precision exchange);
- ``astra`` for every G x K: ``kmeans`` (codebooks from k-means, weights untouched) and
  ``finetune`` with NAQ off (lambda = 0) and on (lambda = naq_lambda), each with DCT on and off.
The k-means initialisation is computed once per (G, K) and shared by the variants, so the
variants differ only in what the row says. Every accuracy comes from ``runtime_eval`` (RankRunner
+ the real ``astra`` method on checkpoint files); the simulation's accuracy is recorded beside it.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from testbed.methods.astra import HEADER_BYTES
from testbed.methods.base import token_chunks
from testbed.methods.vq import code_bits
from testbed.train.base import train_base
from testbed.train.checkpoint import codebook_path, load_checkpoint, save_checkpoint
from testbed.train.config import BaseTrainConfig, FinetuneConfig
from testbed.train.data import load_split
from testbed.train.evaluate import runtime_eval, sim_accuracy
from testbed.train.finetune import finetune, fit_codebooks

GROUPS = (1, 4, 16, 32)
CODEBOOK_SIZES = (256, 1024)
EVAL_SPLIT = "digits-test"


def _row(kind: str, **kw: Any) -> dict[str, Any]:
    base = {"variant": kind, "world_size": 1, "groups": None, "codebook_size": None, "dct": None,
            "naq_lambda": None, "finetuned": False, "test_acc": None, "sim_test_acc": None,
            "fp32_over_astra": None, "bytes_per_block_per_peer": None, "train_wall_s": 0.0, "checkpoint": ""}
    base.update(kw)
    return base


def _volume(model_cfg, G: int, K: int, dct: bool, world_size: int, tokens: int) -> tuple[float, int]:
    """(compression vs fp32 per exchanged token = 32*D / (G*b), bytes rank 0 sends each peer per block)."""
    b = code_bits(K)
    s, e = token_chunks(tokens - (1 if dct else 0), world_size)[0]
    return 32 * model_cfg.dim / (G * b), HEADER_BYTES + math.ceil((e - s) * G * b / 8)


def base_model(ckpt_root: Path, cfg: BaseTrainConfig, base_dir: str | None, log) -> tuple[Any, float, Path]:
    """The trained model: loaded from ``base_dir`` if given, else trained and saved to ckpt_root/base."""
    if base_dir:
        model, _, _ = load_checkpoint(base_dir, cfg.model)
        return model, 0.0, Path(base_dir)
    model, hist = train_base(cfg)
    d = save_checkpoint(ckpt_root / "base", model, None, {"stage": "base", "config": cfg.to_dict(), **hist.to_dict()})
    log(f"base: {cfg.epochs} epochs in {hist.wall_s:.0f} s, last-epoch train acc {hist.epoch_train_acc[-1]:.3f}")
    return model, hist.wall_s, d


def run_table(ckpt_root: str | Path, base_cfg: BaseTrainConfig, ft_cfg: FinetuneConfig, base_dir: str | None = None,
              groups=GROUPS, codebook_sizes=CODEBOOK_SIZES, log=print) -> pd.DataFrame:
    """All rows of the study (see the module docstring) as a DataFrame. Checkpoints go under ckpt_root."""
    root = Path(ckpt_root)
    model, base_wall, bdir = base_model(root, base_cfg, base_dir, log)
    name, N, T = base_cfg.model, ft_cfg.world_size, 1 + (model.cfg.image_size // model.cfg.patch_size) ** 2
    images, labels = load_split(EVAL_SPLIT)
    train_images, _ = ft_cfg.training_set()
    rows = [_row("original", test_acc=runtime_eval(name, "single", 1, str(bdir), tokens=T).accuracy,
                 train_wall_s=base_wall, checkpoint=str(bdir)),
            _row("sequence_parallel", world_size=N, checkpoint=str(bdir),
                 test_acc=runtime_eval(name, "sequence_parallel", N, str(bdir), tokens=T).accuracy)]
    log(f"original {rows[0]['test_acc']:.4f}, sequence_parallel {rows[1]['test_acc']:.4f}")
    for G in groups:
        for K in codebook_sizes:
            t0 = time.perf_counter()
            init = fit_codebooks(model, train_images, G, K, ft_cfg.kmeans_tokens, ft_cfg.kmeans_iters, ft_cfg.seed)
            kmeans_s = time.perf_counter() - t0
            for lam, tuned in ((None, False), (0.0, True), (ft_cfg.naq_lambda, True)):
                for dct in (True, False):
                    cfg = replace(ft_cfg, groups=G, codebook_size=K, dct=dct, naq_lambda=lam or 0.0)
                    if tuned:
                        net, cb, hist = finetune(model, cfg, init)
                        wall, extra = kmeans_s + hist.wall_s, hist.to_dict()
                    else:
                        net, cb, wall, extra = model, init, kmeans_s, {}
                    tag = f"g{G}-k{K}-{'dct' if dct else 'nodct'}-" + (f"naq{lam:g}" if tuned else "kmeans")
                    d = save_checkpoint(root / tag, net, cb, {"stage": "finetune" if tuned else "kmeans",
                                                              "config": cfg.to_dict(), **extra})
                    acc = runtime_eval(name, "astra", N, str(d), codebook_path(d), {"dct": dct}, tokens=T).accuracy
                    ratio, nbytes = _volume(model.cfg, G, K, dct, N, T)
                    rows.append(_row("astra", world_size=N, groups=G, codebook_size=K, dct=dct, naq_lambda=lam,
                                     finetuned=tuned, test_acc=acc, train_wall_s=wall, checkpoint=str(d),
                                     sim_test_acc=sim_accuracy(net, cb, N, dct, images, labels),
                                     fp32_over_astra=ratio, bytes_per_block_per_peer=nbytes))
                    log(f"{tag}: test {acc:.4f} (sim {rows[-1]['sim_test_acc']:.4f}), {wall:.0f} s")
    return pd.DataFrame(rows)
