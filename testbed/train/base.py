"""Stage 1: train vit-digits from scratch on the offline digits (plain single-device forward)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from testbed.models import TransformerModel, build_model
from testbed.train.config import BaseTrainConfig
from testbed.train.loop import History, train


def param_groups(model: torch.nn.Module) -> list[dict]:
    """AdamW groups: no weight decay on biases, LayerNorms, CLS and position embeddings (1-d or tokens)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or name in ("cls_token", "pos") else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_base(cfg: BaseTrainConfig) -> tuple[TransformerModel, History]:
    """A model of ``cfg.model`` trained from the seed-``cfg.seed`` init on ``cfg.dataset``; eval mode."""
    model = build_model(cfg.model, seed=cfg.seed)
    images, labels = cfg.training_set()

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)  # (B, classes)
        return F.cross_entropy(logits, y), logits

    hist = train(cfg, param_groups(model), loss_fn, images, labels, [model])
    return model, hist
