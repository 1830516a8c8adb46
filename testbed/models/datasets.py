"""Offline labelled image data: scikit-learn's bundled handwritten digits, for inference and training.

1797 grey 8x8 digits (UCI optdigits, shipped inside scikit-learn: no download at run time),
bilinearly upsampled to 32x32 so that vit-digits (patch 4) sees 64 patches + CLS = 65 tokens,
enough to split over 4 devices. Pixel values are scaled to [0, 1] and standardised with the
training split's mean and std. The train/test split is a fixed seeded permutation, so every
process (trainer, node servers, evaluation) sees the same images in the same order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from testbed.errors import ConfigError

IMAGE_SIZE_PX = 32  # side of the upsampled image; vit-digits' image_size
TEST_FRACTION = 0.2  # share of the 1797 images held out for test (359 images)
SPLIT_SEED = 0  # the permutation that defines the split; changing it changes every result
MINI_IMAGES = 32  # digits-test-mini: the first images of digits-test (quick checks, slow emulated links)
SPLITS = ("digits-train", "digits-test", "digits-test-mini")


def _all_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as float [N, 1, 32, 32] in [0, 1] and int64 labels [N], in scikit-learn's order."""
    from sklearn.datasets import load_digits  # imported here: only the accuracy study needs it

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8), 16 = max grey level
    x = F.interpolate(x, size=(IMAGE_SIZE_PX, IMAGE_SIZE_PX), mode="bilinear", align_corners=False)
    return x, torch.tensor(d.target, dtype=torch.int64)


def _split_indices(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = round(n * TEST_FRACTION)
    return perm[n_test:], perm[:n_test]


def load_split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A named split: (images float32 [N, 1, 32, 32], standardised; labels int64 [N]).

    ``digits-train``: 1438 images, ``digits-test``: 359 images, ``digits-test-mini``: the first 32
    images of digits-test. Unknown name -> ConfigError listing the allowed names.
    """
    if name not in SPLITS:
        raise ConfigError("dataset", name, ", ".join(SPLITS))
    x, y = _all_images()
    train_idx, test_idx = _split_indices(len(y))
    train = x[train_idx]
    mean, std = train.mean(), train.std()  # statistics of the training split only: no test leakage
    idx = {"digits-train": train_idx, "digits-test": test_idx, "digits-test-mini": test_idx[:MINI_IMAGES]}[name]
    return ((x[idx] - mean) / std).contiguous(), y[idx].contiguous()
