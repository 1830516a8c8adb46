"""Short training runs lower their objective; k-means initialisation is right and deterministic."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from testbed.methods import vq
from testbed.models import build_model
from testbed.train.astra_sim import AstraSim
from testbed.train.base import train_base
from testbed.train.config import BaseTrainConfig, FinetuneConfig
from testbed.train.data import load_split
from testbed.train.finetune import finetune, fit_codebooks


def _ce(predict, x, y) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(predict(x), y))


def test_a_few_batches_of_base_training_lower_the_loss():
    x, y = load_split("digits-train")
    x, y = x[:32], y[:32]
    before = _ce(build_model("vit-digits", seed=0), x, y)
    cfg = BaseTrainConfig(max_images=32, batch_size=32, epochs=15, warmup_steps=1, lr=1e-3, max_shift_px=0)
    model, hist = train_base(cfg)
    assert len(hist.step_loss) == 15 and not model.training
    assert _ce(model, x, y) < before - 0.3  # measured: 2.32 -> 1.74


def test_a_few_batches_of_finetuning_lower_the_astra_objective():
    model = build_model("vit-digits", seed=0)
    x, y = load_split("digits-train")
    x, y = x[:32], y[:32]
    cfg = FinetuneConfig(groups=4, codebook_size=16, naq_lambda=1.0, dct=False, epochs=10, max_images=32,
                         batch_size=32, warmup_steps=1, lr=5e-4, kmeans_tokens=1000, kmeans_iters=5,
                         max_shift_px=0)
    init = fit_codebooks(model, x, cfg.groups, cfg.codebook_size, cfg.kmeans_tokens, cfg.kmeans_iters)

    def objective(net, cb) -> float:  # eval mode (no NAQ noise): task loss + quantization error
        sim = AstraSim(net, cb, 4, dct=False).eval()
        with torch.no_grad():
            return float(F.cross_entropy(sim(x), y) + sim.vq_losses[0])

    before = objective(model, init)
    tuned, cb, hist = finetune(model, cfg, init)
    assert len(hist.step_loss) == 10 and cb.shape == init.shape
    assert objective(tuned, cb) < before - 0.1
    assert not torch.equal(cb, init)  # the codebooks were trained too
    fresh = build_model("vit-digits", seed=0).state_dict()  # the input model is left as it was
    assert all(torch.equal(v, fresh[k]) for k, v in model.state_dict().items())


def test_kmeans_groups_finds_separated_clusters_deterministically():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, 2, generator=gen) * 10  # 3 groups, 8 clusters in 2-d
    pts = centres.repeat_interleave(50, dim=1) + 0.01 * torch.randn(3, 400, 2, generator=gen)
    c = vq.kmeans_groups(pts, 8, iters=20, seed=1)
    assert torch.equal(c, vq.kmeans_groups(pts, 8, iters=20, seed=1))
    for g in range(3):  # every true centre has a found centre within the noise
        d = torch.cdist(centres[g], c[g]).min(-1).values
        assert d.max() < 0.1


