"""The training forward (AstraSim) against the original model and the inference method's layout."""

from __future__ import annotations

import pytest
import torch

from testbed.methods.base import token_chunks
from testbed.methods.vq import exact_codebooks
from testbed.models import build_model
from testbed.train.astra_sim import AstraSim, key_mask, token_layout
from testbed.train.data import load_split


@pytest.fixture(scope="module")
def model_and_images():
    model = build_model("vit-digits", seed=1)
    x, _ = load_split("digits-test-mini")
    return model, x[:6]


@pytest.mark.parametrize("groups", [1, 4, 32])
@pytest.mark.parametrize("dct", [True, False])
def test_exact_codebook_and_no_noise_reproduce_the_original(model_and_images, groups, dct):
    model, x = model_and_images
    sim = AstraSim(model, exact_codebooks(model, x, groups), world_size=4, dct=dct, naq_lambda=0.0).eval()
    with torch.no_grad():
        torch.testing.assert_close(sim(x), model(x), rtol=1e-5, atol=1e-5)


def test_coarse_codebook_changes_the_output(model_and_images):
    """The check above can fail: with 2 entries per block, non-local keys really are quantized."""
    model, x = model_and_images
    cb = exact_codebooks(model, x, 1)[:, :, :2].contiguous()
    sim = AstraSim(model, cb, world_size=4, dct=True).eval()
    with torch.no_grad():
        assert (sim(x) - model(x)).abs().max() > 1e-2


def test_layout_mirrors_the_astra_method():
    T, N = 65, 4
    src, owner, shared, cls_pos = token_layout(T, N, dct=True)
    assert len(src) == T - 1 + N and cls_pos == [0, 17, 34, 51]
    for r, (s, e) in enumerate(token_chunks(T - 1, N)):  # astra: own CLS copy + own patch chunk
        i = cls_pos[r]
        assert src[i:i + 1 + e - s] == [0] + list(range(1 + s, 1 + e))
        assert (owner[i:i + 1 + e - s] == r).all() and not shared[i] and shared[i + 1:i + 1 + e - s].all()
    src, owner, shared, cls_pos = token_layout(T, N, dct=False)
    assert src == list(range(T)) and cls_pos == [0] and shared.all()
    assert [int((owner == r).sum()) for r in range(N)] == [e - s for s, e in token_chunks(T, N)]


def test_mask_full_precision_local_quantized_remote_cls_private():
    _, owner, shared, cls_pos = token_layout(9, 2, dct=True)  # 8 patches, 2 devices: [C a a a a C b b b b]
    m = key_mask(owner, shared)
    S = len(owner)
    assert m.shape == (S, 2 * S)
    assert m[0, :5].all() and not m[0, 5:S].any()  # CLS copy 0: its own device's tokens, full precision
    assert not m[0, S + 5] and m[0, S + 6:].all()  # ... and device 1's patches quantized, not its CLS copy
    assert not m[0, S:S + 5].any()  # never its own device's tokens through codes


def test_noise_only_in_training_with_positive_lambda(model_and_images):
    model, x = model_and_images
    cb = exact_codebooks(model, x, 4)
    sim = AstraSim(model, cb, world_size=4, dct=True, naq_lambda=1.0)
    with torch.no_grad():
        ref = sim.eval()(x)
        assert torch.equal(sim(x), ref)  # eval: deterministic, no noise
        # exact codebook: residual 0, so NAQ's noise (lambda * residual RMS) is 0 even in training
        torch.testing.assert_close(sim.train()(x), ref, rtol=1e-5, atol=1e-5)
        coarse = AstraSim(model, cb[:, :, :4].contiguous(), world_size=4, dct=True, naq_lambda=1.0)
        a, b = coarse.train()(x), coarse.train()(x)
        assert not torch.equal(a, b)  # noisy in training
        coarse.eval()
        assert torch.equal(coarse(x), coarse(x))


def test_gradients_reach_the_weights_and_ema_moves_entries_to_their_tokens(model_and_images):
    model, x = model_and_images
    x = x[:2]
    cb = exact_codebooks(model, x, 4) + 0.3  # every token has its own entry, 0.3 off in every coordinate
    sim = AstraSim(model, cb, world_size=4, dct=False, naq_lambda=0.5, ema_decay=0.5).train()
    loss = sim(x).logsumexp(-1).mean() + sim.vq_losses[1]
    loss.backward()
    assert model.patch.weight.grad.abs().sum() > 0 and model.blocks[0].ln1.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        frozen = AstraSim(model, cb, world_size=4, dct=False).train()
        frozen(x)
        assert torch.equal(frozen.codebooks, cb)  # no ema_decay: entries fixed
        errs = []
        for _ in range(4):  # one forward per step: the codebook error of the same tokens shrinks
            sim.eval()(x)
            errs.append(float(sim.vq_losses[0]))
            sim.train()(x)
        assert errs[-1] < 0.25 * errs[0]  # decay 0.5: each step moves an entry halfway to its tokens' mean
        sim.eval()(x)  # eval-mode forwards never move the entries
        before = sim.codebooks.clone()
        sim(x)
        assert torch.equal(sim.codebooks, before)
