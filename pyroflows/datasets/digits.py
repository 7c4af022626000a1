"""scikit-learn's 8x8 handwritten digits (1,797 images, 17 grey levels), shipped inside the
package: nothing is downloaded."""

from __future__ import annotations

import torch

from pyroflows._optional import require

NUM_LEVELS = 17  # pixel values 0..16


def digits(
    *, binarize: bool = False, test_fraction: float = 0.2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as ``(train, test)`` float32 tensors of shape ``(n, 1, 8, 8)``.

    Args:
        binarize: threshold at 8 to give 0/1 pixels instead of the integer levels 0..16.
        test_fraction: share of images held out (a fixed, seeded split).
        seed: seed of the split.

    Example:
        >>> train, test = digits()
        >>> train.shape[1:], int(train.max())
        (torch.Size([1, 8, 8]), 16)
    """
    load_digits = require("sklearn.datasets").load_digits

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    images = torch.as_tensor(load_digits().images, dtype=torch.float32)[:, None]
    if binarize:
        images = (images >= 8).float()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed), device="cpu")
    num_test = int(round(test_fraction * len(images)))
    return images[order[num_test:]], images[order[:num_test]]
