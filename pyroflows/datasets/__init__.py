"""Data that needs no download: generated 2-D toys, scikit-learn's digits, and user files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pyroflows.datasets.digits import NUM_LEVELS, digits
from pyroflows.datasets.toy import toy, toy_names

__all__ = ["NUM_LEVELS", "digits", "load", "toy", "toy_names"]


def load(
    source: str, num_samples: int = 10_000, *, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, test)`` data from a built-in name or a ``.npy`` / ``.csv`` file.

    Args:
        source: a toy name, ``"digits"``, or the path of a file holding a 2-D numeric array ``(n,
            D)`` (CSV: comma separated, an optional header line).
        num_samples: training points of a toy (the test set has ``num_samples // 4``, another seed).
        seed: seed of the toy draws and of the 80/20 split of a file.

    Returns:
        ``(train, test)`` float32 tensors.
    """
    if source in toy_names():
        return toy(source, num_samples, seed=seed), toy(
            source, max(num_samples // 4, 1), seed=seed + 10_000
        )
    if source == "digits":
        return digits()
    path = Path(source)
    if path.suffix not in (".npy", ".csv"):
        raise ValueError(
            f"data must be one of {', '.join(toy_names())}, digits, or a .npy/.csv file; "
            f"got {source!r}"
        )
    if not path.is_file():
        raise ValueError(f"data file not found: {source}")
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            array = np.genfromtxt(path, delimiter=",", skip_header=0)
            if array.ndim == 2 and np.isnan(array[0]).all():  # a header line
                array = array[1:]
    except Exception as err:  # noqa: BLE001 - any parse failure is the file's fault
        raise ValueError(f"could not read {source}: {' '.join(str(err).split())}") from None
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or len(array) < 2:
        raise ValueError(
            f"{source} must hold a 2-D array (n, D) with n >= 2, got shape {array.shape}"
        )
    data = torch.as_tensor(np.asarray(array, dtype=np.float32))
    if not torch.isfinite(data).all():
        raise ValueError(f"{source} contains missing, NaN or inf values")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed), device="cpu")
    num_test = max(1, len(data) // 5)
    return data[order[num_test:]], data[order[:num_test]]
