"""The real ASTRA method through the node runtime, with lambda = 0 and exact codebooks, is the original."""

from __future__ import annotations

import pytest
import torch

from testbed.methods.vq import exact_codebooks, save_codebooks
from testbed.models import build_model
from testbed.train.checkpoint import save_checkpoint
from testbed.train.data import load_split
from testbed.train.evaluate import runtime_eval


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = build_model("vit-digits", seed=5)
    d = save_checkpoint(tmp_path_factory.mktemp("ck") / "m", model, None, {"config": {"model": "vit-digits"}})
    x, y = load_split("digits-test-mini")
    with torch.no_grad():
        ref = model(x)
    return model, d, x, y, ref


@pytest.mark.parametrize("dct", [True, False])
def test_astra_with_exact_codebooks_reproduces_single(ckpt, dct):
    model, d, x, y, ref = ckpt
    cb_file = d / "exact.pt"
    save_codebooks(cb_file, exact_codebooks(model, x, 4))  # every test token is an entry: lossless
    single = runtime_eval("vit-digits", "single", 1, str(d), dataset="digits-test-mini")
    astra = runtime_eval("vit-digits", "astra", 4, str(d), str(cb_file), {"dct": dct}, dataset="digits-test-mini")
    torch.testing.assert_close(single.logits, ref, rtol=0, atol=0)
    torch.testing.assert_close(astra.logits, ref, rtol=1e-5, atol=1e-5)
    assert astra.accuracy == single.accuracy


def test_coarse_codebooks_do_change_the_runtime_output(ckpt):
    """The check above can fail: with 2 entries per group the exchange is lossy."""
    model, d, x, y, ref = ckpt
    cb_file = d / "coarse.pt"
    save_codebooks(cb_file, exact_codebooks(model, x, 4)[:, :, :2].contiguous())
    astra = runtime_eval("vit-digits", "astra", 4, str(d), str(cb_file), {"dct": True}, dataset="digits-test-mini")
    assert (astra.logits - ref).abs().max() > 1e-2
