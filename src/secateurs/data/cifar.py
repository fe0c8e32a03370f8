"""CIFAR-10 and CIFAR-100, "python version" pickles as distributed by the Toronto site."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ._io import unpickle
from .dataset import ImageDataset

_PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class _Layout:
    """Where one CIFAR variant keeps its files and labels, and its published statistics."""

    subdir: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_key: bytes
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def files(self) -> tuple[str, ...]:
        return self.train + self.test


_LAYOUTS = MappingProxyType({
    10: _Layout(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        b"labels",
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    ),
    100: _Layout(
        "cifar-100-python",
        ("train",),
        ("test",),
        b"fine_labels",
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
    ),
})


def _resolve(root: Path, layout: _Layout, num_classes: int) -> Path:
    """Accept the extracted directory itself or its parent (where the archive was unpacked)."""
    candidates = (root, root / layout.subdir)
    for directory in candidates:
        if all((directory / name).is_file() for name in layout.files):
            return directory
    raise DataError(
        f"CIFAR-{num_classes}: expected files {', '.join(layout.files)} in {candidates[0]} or "
        f"{candidates[1]}, some are missing; download cifar-{num_classes}-python.tar.gz from "
        "https://www.cs.toronto.edu/~kriz/cifar.html, extract it and pass its directory as --data-root"
    )


def _read_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    batch = unpickle(path, encoding="bytes")
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(
            f"{path} is not a CIFAR batch: expected keys b'data' and {label_key!r}, found {found}; "
            "re-download it"
        )
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS or len(data) != len(labels):
        raise DataError(
            f"{path}: expected uint8 data [N, {_PIXELS}] and N labels, got {data.dtype} {data.shape} "
            f"and {len(labels)} labels; re-download it"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _read_split(directory: Path, names: tuple[str, ...], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    batches = [_read_batch(directory / name, label_key) for name in names]
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    return torch.from_numpy(images), torch.from_numpy(labels)


def load_cifar(root: str | Path, num_classes: int = 10) -> ImageDataset:
    """CIFAR-10 (``num_classes=10``) or CIFAR-100 with its fine labels (``num_classes=100``)."""
    if num_classes not in _LAYOUTS:
        raise ConfigError(f"CIFAR has 10 or 100 classes, got num_classes={num_classes!r}")
    layout = _LAYOUTS[num_classes]
    directory = _resolve(Path(root), layout, num_classes)
    train_x, train_y = _read_split(directory, layout.train, layout.label_key)
    test_x, test_y = _read_split(directory, layout.test, layout.label_key)
    return ImageDataset(
        f"cifar{num_classes}", train_x, train_y, test_x, test_y, num_classes, layout.mean, layout.std
    )
