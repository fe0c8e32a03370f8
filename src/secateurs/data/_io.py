"""Reading raw files, turning every way they can be broken into one DataError naming the file."""
from __future__ import annotations

import gzip
import pickle
import zlib
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import DataError

# What a truncated or garbled pickle / gzip stream raises, depending on where it breaks.
_CORRUPT = (
    EOFError,
    gzip.BadGzipFile,
    zlib.error,
    pickle.UnpicklingError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    AttributeError,
    ImportError,
)


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # type: ignore[return-value]


def _corrupt(path: Path, exc: BaseException) -> DataError:
    return DataError(
        f"{path} is truncated or corrupted ({type(exc).__name__}: {exc}); delete it and download it again"
    )


def read_bytes(path: Path) -> bytes:
    """Whole file, gunzipped when the name ends in ``.gz``."""
    try:
        with _open(path) as f:
            return f.read()
    except _CORRUPT as exc:
        raise _corrupt(path, exc) from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def unpickle(path: Path, encoding: str) -> Any:
    """Unpickle a (possibly gzipped) dataset file, streaming to avoid a second copy in memory.

    Pickles can run code: this is only for the published dataset formats, from trusted sources.
    """
    try:
        with _open(path) as f:
            return pickle.load(f, encoding=encoding)
    except _CORRUPT as exc:
        raise _corrupt(path, exc) from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
