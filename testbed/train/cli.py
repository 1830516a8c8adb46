"""`testbed train ...`: the accuracy study from the command line.

  testbed train base     --out DIR [--epochs 30 ...]          train vit-digits from scratch
  testbed train finetune --base DIR --out DIR --groups G --codebook-size K [--no-dct] [--naq-lambda L]
  testbed train eval     --checkpoint DIR [--method astra] [--world-size 4] [--dataset digits-test]
  testbed train table    [--out results/reference/accuracy] [--base DIR]   the whole G x K x NAQ x DCT table

Every training option is a field of BaseTrainConfig / FinetuneConfig (``--naq-lambda`` is
``naq_lambda``); bad values are one error naming the field, before anything runs or is written.
"""

from __future__ import annotations

import argparse
import sys
import time
import typing
from dataclasses import MISSING, fields

import torch

from testbed.errors import ConfigError
from testbed.train.config import BaseTrainConfig, FinetuneConfig

DEFAULT_TABLE_DIR = "results/reference/accuracy"
DEFAULT_CKPT_DIR = "results/checkpoints/accuracy"


_SWEPT = ("groups", "codebook_size", "dct")  # the table sets these itself


def _add_config_options(p: argparse.ArgumentParser, cls, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    """One --option per dataclass field, typed from its default (bools get --x / --no-x)."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not MISSING else None
        flag = "--" + prefix + f.name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, dest=prefix + f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            typ = int if hints[f.name] in (int, int | None) else float if hints[f.name] is float else str
            p.add_argument(flag, dest=prefix + f.name, type=typ, default=None, metavar=f.name.upper(),
                           help=f"default {default}")


def _config(cls, args: argparse.Namespace, prefix: str = ""):
    given = {f.name: getattr(args, prefix + f.name, None) for f in fields(cls)}
    return cls(**{k: v for k, v in given.items() if v is not None})


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError("list", text, "comma-separated integers, e.g. 1,4,16,32") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="testbed train", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: shared cores)")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("base", help="train the model from scratch")
    b.add_argument("--out", required=True, help="checkpoint directory to write")
    _add_config_options(b, BaseTrainConfig)
    f = sub.add_parser("finetune", help="fine-tune with ASTRA VQ in place (k-means init, STE, NAQ, DCT)")
    f.add_argument("--base", required=True, help="checkpoint directory of the trained model")
    f.add_argument("--out", required=True, help="checkpoint directory to write (model + codebooks)")
    _add_config_options(f, FinetuneConfig)
    e = sub.add_parser("eval", help="test accuracy of a checkpoint through RankRunner in-process")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--method", default=None, help="default: astra if the checkpoint has codebooks, else single")
    e.add_argument("--world-size", type=int, default=4)
    e.add_argument("--dataset", default="digits-test")
    t = sub.add_parser("table", help="the whole accuracy table (trains base, fine-tunes every variant)")
    t.add_argument("--out", default=DEFAULT_TABLE_DIR, help="where accuracy.csv/.md/.png go")
    t.add_argument("--checkpoints", default=DEFAULT_CKPT_DIR, help="where checkpoints go")
    t.add_argument("--base", default=None, help="reuse this trained checkpoint instead of training one")
    t.add_argument("--groups", dest="sweep_groups", type=_ints, default=(1, 4, 16, 32), help="G values, e.g. 1,4,16,32")
    t.add_argument("--codebook-sizes", dest="sweep_sizes", type=_ints, default=(256, 1024), help="K values")
    _add_config_options(t, BaseTrainConfig, prefix="base_")
    _add_config_options(t, FinetuneConfig, skip=_SWEPT)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        torch.set_num_threads(args.threads)
        return {"base": _base, "finetune": _finetune, "eval": _eval, "table": _table}[args.cmd](args)
    except ConfigError as e:
        print(f"testbed train: error: {e}", file=sys.stderr)
        return 2


def _base(args) -> int:
    from testbed.train.base import train_base
    from testbed.train.checkpoint import save_checkpoint

    cfg = _config(BaseTrainConfig, args)
    model, hist = train_base(cfg)
    save_checkpoint(args.out, model, None, {"stage": "base", "config": cfg.to_dict(), **hist.to_dict()})
    print(f"trained {cfg.model} in {hist.wall_s:.0f} s; last-epoch train acc {hist.epoch_train_acc[-1]:.4f}; "
          f"checkpoint {args.out}")
    return 0


def _finetune(args) -> int:
    from testbed.train.checkpoint import load_checkpoint, save_checkpoint
    from testbed.train.finetune import finetune

    cfg = _config(FinetuneConfig, args)
    model, _, _ = load_checkpoint(args.base, cfg.model)
    net, cb, hist = finetune(model, cfg)
    save_checkpoint(args.out, net, cb, {"stage": "finetune", "base": args.base, "config": cfg.to_dict(),
                                        **hist.to_dict()})
    print(f"fine-tuned G={cfg.groups} K={cfg.codebook_size} dct={cfg.dct} lambda={cfg.naq_lambda} in "
          f"{hist.wall_s:.0f} s; checkpoint {args.out} (model.safetensors + codebooks.pt)")
    return 0


def _eval(args) -> int:
    from testbed.train.checkpoint import codebook_path, model_name, read_meta
    from testbed.train.evaluate import runtime_eval

    meta = read_meta(args.checkpoint)
    cb = codebook_path(args.checkpoint)
    method = args.method or ("astra" if cb else "single")
    params = {"dct": meta["config"]["dct"]} if method == "astra" and "dct" in meta.get("config", {}) else {}
    n = 1 if method == "single" else args.world_size
    r = runtime_eval(model_name(meta), method, n, args.checkpoint, cb if method == "astra" else None, params,
                     dataset=args.dataset)
    print(f"{method} N={n} {params or ''} on {args.dataset}: accuracy {100 * r.accuracy:.2f}% "
          f"({len(r.labels)} images)")
    return 0


def _table(args) -> int:
    from testbed.train import report
    from testbed.train.table import run_table

    base_cfg, ft_cfg = _config(BaseTrainConfig, args, "base_"), _config(FinetuneConfig, args)
    t0 = time.perf_counter()
    df = run_table(args.checkpoints, base_cfg, ft_cfg, args.base, args.sweep_groups, args.sweep_sizes,
                   log=lambda s: print(f"[{time.perf_counter() - t0:6.0f} s] {s}", flush=True))
    wall = time.perf_counter() - t0
    header = (f"Accuracy on digits-test (359 images), vit-digits, N={ft_cfg.world_size}; made by `testbed train "
              f"table` in {wall / 60:.1f} min on {torch.get_num_threads()} torch thread(s).")
    for p in report.write(df, args.out, header):
        print(f"wrote {p}")
    return 0
