"""scikit-learn's embedded 8x8 digits: a real dataset that needs no download, for quick runs."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import DataError
from .dataset import ImageDataset, channel_stats

DIGITS_TEST_SIZE = 360  # of 1,797: leaves the 1,437 / 360 split used by the examples
_GRAY_LEVELS = 16


def _load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    try:  # lazy: scikit-learn is a test extra, not a dependency
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataError("the digits dataset comes with scikit-learn; run `pip install scikit-learn`") from exc
    bunch = load_digits()
    return np.asarray(bunch.images), np.asarray(bunch.target)


def load_digits_dataset(seed: int = 0) -> ImageDataset:
    """1,437 train / 360 test, split by a seeded permutation so every run sees the same split."""
    pixels, target = _load_sklearn_digits()
    images = torch.from_numpy(np.rint(pixels * (255.0 / _GRAY_LEVELS)).clip(0, 255).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test_idx, train_idx = order[:DIGITS_TEST_SIZE].sort().values, order[DIGITS_TEST_SIZE:].sort().values
    mean, std = channel_stats(images[train_idx])
    return ImageDataset(
        "digits", images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], 10, mean, std
    )
