"""Any image classification set saved as ``.npz`` with x_train / y_train / x_test / y_test."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .dataset import ImageDataset, channel_stats

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_CHANNELS = (1, 3)


def _open(path: Path) -> np.lib.npyio.NpzFile:
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise DataError(f"{path} does not exist; pass --data-root with the path of an .npz file") from exc
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        raise DataError(f"{path} is not a readable .npz archive ({exc}); save or download it again") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path} holds a single array, not an .npz archive with keys {', '.join(NPZ_KEYS)}")
    return archive


def _read(path: Path) -> dict[str, np.ndarray]:
    with _open(path) as archive:
        missing = [key for key in NPZ_KEYS if key not in archive.files]
        if missing:
            raise DataError(
                f"{path} lacks {', '.join(missing)}: expected keys {', '.join(NPZ_KEYS)}, found "
                f"{', '.join(sorted(archive.files)) or 'none'}; save it with np.savez(path, x_train=..., ...)"
            )
        try:
            return {key: archive[key] for key in NPZ_KEYS}
        except (zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
            raise DataError(f"{path} is truncated or corrupted ({exc}); save or download it again") from exc


def _to_uint8(x: np.ndarray, where: str) -> np.ndarray:
    """Keep bytes as they are; map floats in [0, 1] to 0..255 like image libraries do."""
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating):
        if x.size and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
            raise DataError(f"{where}: float images must lie in [0, 1]; divide by 255 or save them as uint8")
        return np.rint(x * 255.0).astype(np.uint8)
    if np.issubdtype(x.dtype, np.integer) and (not x.size or (x.min() >= 0 and x.max() <= 255)):
        return x.astype(np.uint8)
    raise DataError(f"{where}: images of dtype {x.dtype} are not uint8, 0..255 integers or [0, 1] floats")


def _to_nchw(x: np.ndarray, where: str) -> np.ndarray:
    """NHW gets a channel axis; a last axis of size 1 or 3 means NHWC, anything else NCHW."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        return x.transpose(0, 3, 1, 2) if x.shape[-1] in _CHANNELS else x
    raise DataError(f"{where}: expected images as NHW, NHWC or NCHW, got shape {x.shape}")


def _images(x: np.ndarray, where: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(_to_uint8(_to_nchw(x, where), where)))


def _labels(y: np.ndarray, where: str) -> torch.Tensor:
    if y.ndim == 2 and y.shape[1] == 1:  # Keras-style [N, 1]
        y = y[:, 0]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (y.size and y.min() < 0):
        raise DataError(f"{where}: labels must be non-negative integers [N], got {y.dtype} {y.shape}")
    return torch.from_numpy(y.astype(np.int64))


def load_npz(path: str | Path, name: str = "npz") -> ImageDataset:
    """Mean/std come from the training images, since an arbitrary set has no published values."""
    path = Path(path)
    arrays = _read(path)
    train_x, test_x = _images(arrays["x_train"], f"{path} x_train"), _images(arrays["x_test"], f"{path} x_test")
    train_y, test_y = _labels(arrays["y_train"], f"{path} y_train"), _labels(arrays["y_test"], f"{path} y_test")
    mean, std = channel_stats(train_x)
    num_classes = int(torch.cat([train_y, test_y]).max()) + 1
    return ImageDataset(name, train_x, train_y, test_x, test_y, num_classes, mean, std)
