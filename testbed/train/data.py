"""Training-time data handling: augmentation and epoch batches over testbed.models.datasets' splits.

The splits themselves (scikit-learn's digits, a fixed seeded train/test permutation) live in
testbed.models.datasets, so that node servers and the runner read them without importing train/.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from testbed.models.datasets import IMAGE_SIZE_PX, MINI_IMAGES, SPLITS, load_split  # noqa: F401  (re-exported)


def augment(images: torch.Tensor, max_shift_px: int, gen: torch.Generator) -> torch.Tensor:
    """Random translation of each image by up to ``max_shift_px`` pixels in x and y (zero-padded).

    Digits are few (1438 training images); without shifts a ViT from scratch overfits at once.
    The padding value is the background level (the minimum of the standardised images).
    """
    if max_shift_px <= 0:
        return images
    B, _, H, W = images.shape
    bg = float(images.min())
    padded = F.pad(images, (max_shift_px,) * 4, value=bg)
    dx = torch.randint(0, 2 * max_shift_px + 1, (B,), generator=gen)
    dy = torch.randint(0, 2 * max_shift_px + 1, (B,), generator=gen)
    return torch.stack([padded[i, :, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(B)])


def batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Index tensors of one shuffled epoch over ``n`` samples (the last batch may be shorter)."""
    return list(torch.randperm(n, generator=gen).split(batch_size))
