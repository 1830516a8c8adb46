"""Typed, validated training configurations for the accuracy study.

Two stages, one dataclass each: ``BaseTrainConfig`` (vit-digits from scratch) and
``FinetuneConfig`` (ASTRA VQ modules in place: k-means init, commitment loss, straight-through
estimator, Noise-Augmented Quantization, Distributed Class Token). Bad values raise one
ConfigError naming the field at construction, before anything is trained or written.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from testbed.errors import ConfigError, check
from testbed.models import get_config
from testbed.train.data import SPLITS, load_split


def _positive_int(name: str, v: object) -> None:
    check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, v, "an integer >= 1")


def _optional_positive_int(name: str, v: object) -> None:
    check(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1), name, v, "None or an integer >= 1")


def _nonneg_float(name: str, v: object) -> None:
    check(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 and v == v, name, v, "a number >= 0")


@dataclass(frozen=True)
class _Common:
    model: str = "vit-digits"  # named ViT config (testbed.models.CONFIGS)
    dataset: str = "digits-train"  # training split (testbed.train.data.SPLITS)
    epochs: int = 25  # passes over the training split
    batch_size: int = 64  # images per optimiser step
    lr: float = 1e-3  # peak AdamW learning rate (linear warm-up, then cosine decay to 0)
    weight_decay: float = 0.05  # AdamW decoupled weight decay
    warmup_steps: int = 50  # optimiser steps of linear learning-rate warm-up
    max_shift_px: int = 4  # random translation augmentation, pixels (4 px = one original 8x8 pixel)
    seed: int = 0  # weights init, shuffling, augmentation, noise
    max_steps: int | None = None  # stop after this many optimiser steps (tests: a few batches)
    max_images: int | None = None  # train on the first N images of the split only (None: all)

    def __post_init__(self) -> None:
        cfg = get_config(self.model)  # unknown model -> ConfigError("model", ...)
        check(cfg.kind == "vit", "model", self.model, "a ViT config (the digits are images)")
        check(self.dataset in SPLITS, "dataset", self.dataset, ", ".join(SPLITS))
        _positive_int("epochs", self.epochs)
        _positive_int("batch_size", self.batch_size)
        check(isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool) and self.lr > 0,
              "lr", self.lr, "a number > 0")
        _nonneg_float("weight_decay", self.weight_decay)
        check(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "warmup_steps", self.warmup_steps,
              "an integer >= 0")
        check(isinstance(self.max_shift_px, int) and self.max_shift_px >= 0, "max_shift_px", self.max_shift_px,
              "an integer >= 0")
        check(isinstance(self.seed, int), "seed", self.seed, "an integer")
        _optional_positive_int("max_steps", self.max_steps)
        _optional_positive_int("max_images", self.max_images)

    def training_set(self):
        """(images, labels) this config trains on: ``dataset``, cut to ``max_images``."""
        images, labels = load_split(self.dataset)
        return images[:self.max_images], labels[:self.max_images]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """Build from a dict; unknown keys are a ConfigError naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(unknown[0], d[unknown[0]], "a known field: " + ", ".join(sorted(known)))
        return cls(**d)


@dataclass(frozen=True)
class BaseTrainConfig(_Common):
    """Stage 1: train the model from scratch on the digits."""


@dataclass(frozen=True)
class FinetuneConfig(_Common):
    """Stage 2: fine-tune with ASTRA VQ modules in place, simulated in one process.

    Codebook entries follow the tokens assigned to them by exponential moving averages
    (VQ-VAE-2), not by gradient of a codebook loss: in a fine-tune of a few epochs, gradient-learned
    entries lagged behind the drifting h (codebook loss 0.49 -> 0.51 over 2 epochs at G=1, K=256,
    vs 0.41 -> 0.40 with EMA). The encoder gets the task gradient through the straight-through
    estimator and the commitment loss beta * ||h - sg(e)||^2.
    """

    epochs: int = 2  # budget: the 32-variant table runs in ~15 min on 2 shared cores
    lr: float = 2e-4
    warmup_steps: int = 10
    world_size: int = 4  # N simulated devices (token chunks)
    groups: int = 1  # G groups per token; must divide the model's D
    codebook_size: int = 1024  # K entries per (block, group) codebook
    dct: bool = True  # Distributed Class Token: every device its own CLS copy, averaged at the end
    naq_lambda: float = 1.0  # NAQ: noise std = lambda * std of the quantization residual (h_hat - h)
    beta: float = 2.5e-4  # commitment loss weight (paper: 1e-4 .. 5e-4)
    ema_decay: float = 0.9  # EMA: weight of the old entry per step (short fine-tunes need a short memory)
    kmeans_iters: int = 10  # Lloyd iterations of the k-means initialisation
    kmeans_tokens: int = 10000  # token vectors sampled per block for the k-means initialisation

    def __post_init__(self) -> None:
        super().__post_init__()
        D = get_config(self.model).dim
        _positive_int("world_size", self.world_size)
        _positive_int("groups", self.groups)
        check(D % self.groups == 0, "groups", self.groups,
              f"a divisor of the model's D={D}: " + ", ".join(str(g) for g in range(1, D + 1) if D % g == 0))
        check(isinstance(self.codebook_size, int) and not isinstance(self.codebook_size, bool)
              and self.codebook_size >= 2, "codebook_size", self.codebook_size, "an integer >= 2")
        check(isinstance(self.dct, bool), "dct", self.dct, "true or false")
        _nonneg_float("naq_lambda", self.naq_lambda)
        _nonneg_float("beta", self.beta)
        check(isinstance(self.ema_decay, (int, float)) and 0 < self.ema_decay < 1, "ema_decay", self.ema_decay,
              "a number in (0, 1)")
        _positive_int("kmeans_iters", self.kmeans_iters)
        _positive_int("kmeans_tokens", self.kmeans_tokens)
