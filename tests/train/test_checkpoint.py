"""Checkpoints: saved and reloaded they give identical outputs, in the trainer and in the node runtime."""

from __future__ import annotations

import json

import pytest
import torch

from testbed.errors import ConfigError
from testbed.methods.vq import load_codebooks
from testbed.models import build_model
from testbed.train.astra_sim import AstraSim
from testbed.train.checkpoint import codebook_path, load_checkpoint, save_checkpoint
from testbed.train.config import FinetuneConfig
from testbed.train.data import load_split
from testbed.train.evaluate import runtime_eval
from testbed.train.finetune import finetune


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A briefly fine-tuned model + codebooks (no-DCT, G=4, K=16) saved as a checkpoint."""
    cfg = FinetuneConfig(groups=4, codebook_size=16, dct=False, naq_lambda=1.0, max_steps=2, batch_size=16,
                         kmeans_tokens=1000, kmeans_iters=3, max_images=64)
    model, cb, hist = finetune(build_model("vit-digits", seed=2), cfg)
    d = save_checkpoint(tmp_path_factory.mktemp("ck") / "g4", model, cb,
                        {"stage": "finetune", "config": cfg.to_dict(), **hist.to_dict()})
    return model, cb, cfg, d


def test_reload_gives_identical_weights_codebooks_and_outputs(tuned):
    model, cb, cfg, d = tuned
    again, cb2, meta = load_checkpoint(d)
    assert torch.equal(cb2, cb) and meta["config"]["groups"] == 4 and len(meta["step_loss"]) == 2
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    # the two files the node runtime reads, read the way it reads them
    plain = build_model("vit-digits", weights_path=str(d))
    file_cb, file_meta = load_codebooks(codebook_path(d))
    assert torch.equal(file_cb, cb) and file_meta["groups"] == 4 and file_meta["dct"] is False
    x, _ = load_split("digits-test-mini")
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))
        a = AstraSim(model, cb, 4, dct=False).eval()(x)
        b = AstraSim(plain, file_cb, 4, dct=False).eval()(x)
    assert torch.equal(a, b)
    assert json.loads((d / "train.json").read_text())["stage"] == "finetune"


def test_node_runtime_runs_the_checkpoint_as_trained(tuned):
    """RankRunner + the real astra method on the checkpoint files = the training forward."""
    model, cb, cfg, d = tuned
    got = runtime_eval("vit-digits", "astra", 4, str(d), codebook_path(d), {"dct": False},
                       dataset="digits-test-mini")
    x, y = load_split("digits-test-mini")
    with torch.no_grad():
        want = AstraSim(model, cb, 4, dct=False).eval()(x)
    assert torch.equal(got.labels, y)
    torch.testing.assert_close(got.logits, want, rtol=1e-4, atol=1e-4)
    assert got.accuracy == float((want.argmax(-1) == y).float().mean())


def test_base_checkpoint_has_no_codebooks_and_bad_paths_are_errors(tmp_path):
    d = save_checkpoint(tmp_path / "base", build_model("vit-digits", seed=4), None, {"config": {"model": "vit-digits"}})
    model, cb, _ = load_checkpoint(d)
    assert cb is None and codebook_path(d) is None
    with pytest.raises(ConfigError) as e:
        load_checkpoint(tmp_path / "missing")
    assert e.value.field == "checkpoint"
