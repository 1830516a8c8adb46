"""The one training loop both stages share: shuffled mini-batches, shift augmentation, AdamW
with linear warm-up and cosine decay, and a per-step history of the loss.

The stage supplies ``loss_fn(images, labels) -> (loss, logits)``; the loop knows nothing of
ASTRA, so the base model and the VQ fine-tune are trained identically apart from their forward.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from testbed.train.config import _Common
from testbed.train.data import augment, batches

LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class History:
    """What a training run did: per-step loss, per-epoch train accuracy, wall time in seconds."""

    step_loss: list[float] = field(default_factory=list)
    epoch_train_acc: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return {"step_loss": self.step_loss, "epoch_train_acc": self.epoch_train_acc, "wall_s": self.wall_s}


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))


def train(cfg: _Common, param_groups: list[dict], loss_fn: LossFn, images: torch.Tensor,
          labels: torch.Tensor, modules: list[torch.nn.Module]) -> History:
    """Run ``cfg.epochs`` epochs (or ``cfg.max_steps`` steps) of AdamW over ``images``/``labels``.

    ``param_groups``: AdamW groups, each may carry its own ``weight_decay``. ``modules`` are put
    in train mode for the run and back in eval mode after.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(labels) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    for g in param_groups:
        g.setdefault("weight_decay", cfg.weight_decay)
    opt = torch.optim.AdamW(param_groups, lr=cfg.lr)
    hist, step, t0 = History(), 0, time.perf_counter()
    for m in modules:
        m.train()
    try:
        while step < total:
            correct = seen = 0
            for idx in batches(len(labels), cfg.batch_size, gen):
                if step >= total:
                    break
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * lr_factor(step, total, cfg.warmup_steps)
                x, y = augment(images[idx], cfg.max_shift_px, gen), labels[idx]
                loss, logits = loss_fn(x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                hist.step_loss.append(float(loss.detach()))
                correct += int((logits.argmax(-1) == y).sum())
                seen += len(y)
                step += 1
            hist.epoch_train_acc.append(correct / max(1, seen))
    finally:
        for m in modules:
            m.eval()
    hist.wall_s = time.perf_counter() - t0
    return hist


@torch.no_grad()
def accuracy(predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 256) -> float:
    """Top-1 accuracy of ``predict(images) -> logits`` in batches (no augmentation)."""
    correct = 0
    for i in range(0, len(labels), batch_size):
        correct += int((predict(images[i:i + batch_size]).argmax(-1) == labels[i:i + batch_size]).sum())
    return correct / len(labels)
