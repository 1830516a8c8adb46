"""Stage 2: fine-tune a trained ViT with ASTRA's VQ modules in place (simulated N devices).

1. k-means codebooks [L, G, K, D//G] from the trained model's LN1 outputs on training images
   (patch tokens only: under DCT the CLS copies are never quantized; without DCT the one CLS
   token is 1 of 65 and the fine-tune adapts its codes);
2. AdamW on all weights through AstraSim's forward: cross-entropy + beta * commitment loss,
   straight-through estimator, NAQ noise scaled by lambda; the codebooks follow the tokens
   assigned to them by EMA (see FinetuneConfig for why not by gradient).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from testbed.methods import vq
from testbed.methods.vq import block_inputs
from testbed.models import TransformerModel
from testbed.train.astra_sim import AstraSim
from testbed.train.base import param_groups
from testbed.train.config import FinetuneConfig
from testbed.train.loop import History, train


@torch.no_grad()
def fit_codebooks(model: TransformerModel, images: torch.Tensor, groups: int, codebook_size: int,
                  n_tokens: int = 10000, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """k-means codebooks [L, G, K, D//G] fit to the LN1 outputs of ``images``' patch tokens.

    Per block, ``n_tokens`` token vectors are drawn at random (seeded) from all patch tokens; each
    group's K entries are k-means centres of that group's D//G-wide slices.
    """
    D, L = model.cfg.dim, model.cfg.n_layers
    d = D // groups
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(L, groups, codebook_size, d)
    for l, h in enumerate(block_inputs(model, images)):
        pts = h[:, 1:].reshape(-1, D)  # (B*P, D): patch tokens, CLS left out
        pts = pts[torch.randperm(len(pts), generator=gen)[:n_tokens]].view(-1, groups, d)
        out[l] = vq.kmeans_groups(pts.transpose(0, 1), codebook_size, iters=iters, seed=seed * 7919 + l)
    return out


def finetune(model: TransformerModel, cfg: FinetuneConfig,
             codebooks: torch.Tensor | None = None) -> tuple[TransformerModel, torch.Tensor, History]:
    """Fine-tune a copy of ``model`` with VQ in place. Returns (model, codebooks, history), eval mode.

    ``codebooks``: the initial [L, G, K, D//G] (e.g. shared between runs); None -> fit k-means on
    ``cfg.dataset`` with ``cfg.kmeans_tokens`` / ``cfg.kmeans_iters``. ``model`` is not modified.
    """
    images, labels = cfg.training_set()
    model = copy.deepcopy(model).eval()
    if codebooks is None:
        codebooks = fit_codebooks(model, images, cfg.groups, cfg.codebook_size, cfg.kmeans_tokens,
                                  cfg.kmeans_iters, cfg.seed)
    sim = AstraSim(model, codebooks, cfg.world_size, cfg.dct, cfg.naq_lambda, cfg.seed, ema_decay=cfg.ema_decay)

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = sim(x)  # (B, classes)
        return F.cross_entropy(logits, y) + cfg.beta * sim.vq_losses[1], logits

    hist = train(cfg, param_groups(model), loss_fn, images, labels, [sim])
    return model, sim.codebooks.detach().clone(), hist
