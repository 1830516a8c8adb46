"""The offline digits splits: shapes, a fixed disjoint split, clear errors."""

from __future__ import annotations

import pytest
import torch

from testbed.errors import ConfigError
from testbed.train.data import MINI_IMAGES, SPLITS, augment, load_split


def test_splits_have_the_model_shape_and_are_deterministic():
    x, y = load_split("digits-test")
    assert x.shape == (359, 1, 32, 32) and x.dtype == torch.float32
    assert y.shape == (359,) and y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    x2, y2 = load_split("digits-test")
    assert torch.equal(x, x2) and torch.equal(y, y2)
    xm, ym = load_split("digits-test-mini")
    assert torch.equal(xm, x[:MINI_IMAGES]) and torch.equal(ym, y[:MINI_IMAGES])


def test_train_and_test_are_disjoint_and_cover_the_dataset():
    xtr, _ = load_split("digits-train")
    xte, _ = load_split("digits-test")
    assert len(xtr) + len(xte) == 1797
    # no test image appears in the training split (compare flattened pixels)
    train_rows = {tuple(r.tolist()) for r in xtr.flatten(1)[:, ::7]}
    assert not any(tuple(r.tolist()) in train_rows for r in xte.flatten(1)[:, ::7])
    assert abs(float(xtr.mean())) < 1e-4 and abs(float(xtr.std()) - 1) < 1e-4  # standardised on train


def test_unknown_split_names_the_allowed_ones():
    with pytest.raises(ConfigError) as e:
        load_split("cifar10")
    assert e.value.field == "dataset" and all(s in str(e.value) for s in SPLITS)


def test_augment_shifts_within_bounds():
    x, _ = load_split("digits-test-mini")
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(augment(x, 0, gen), x)
    a = augment(x, 4, gen)
    assert a.shape == x.shape and not torch.equal(a, x)
    # every augmented image is some shift of the original, padded with the background level
    bg = float(x.min())
    padded = torch.nn.functional.pad(x[0:1], (4, 4, 4, 4), value=bg)[0, 0]
    shifts = [padded[dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
    assert any(torch.equal(a[0, 0], s) for s in shifts)
