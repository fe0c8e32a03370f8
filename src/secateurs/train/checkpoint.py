"""Atomic checkpoints, format checks and RNG capture.

A checkpoint is written to a temporary file next to its target and moved into place
with ``os.replace``, so a crash mid-write never destroys the last good checkpoint.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError

FORMAT = "secateurs.train.checkpoint"
FORMAT_VERSION = 1
_MAX_LISTED = 5


def _where(path: str | Path | None) -> str:
    return f"checkpoint {str(path)!r}" if path is not None else "the checkpoint"


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable; not possible on every platform, so best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` (tagged with the format) to ``path`` atomically.

    On any failure the temporary file is removed and an existing ``path`` is untouched.
    """
    atomic_torch_save(path, {**payload, "format": FORMAT, "format_version": FORMAT_VERSION})


def atomic_torch_save(path: str | Path, tagged: Any) -> None:
    """``torch.save`` to ``path`` atomically: a temporary file in the same directory,
    fsynced, renamed over ``path``; on failure ``path`` is untouched. Under torchrun
    (:mod:`secateurs.distributed`) a collective: rank 0 writes, every rank returns once it has,
    so each can then load the file."""
    from .. import distributed

    distributed.on_main(_atomic_torch_save, path, tagged)


def _atomic_torch_save(path: str | Path, tagged: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(tagged, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException as err:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        if isinstance(err, Exception):
            raise CheckpointError(
                f"could not write {_where(path)} ({type(err).__name__}: {err}); "
                "any previous file there is unchanged. Check free disk space and permissions."
            ) from err
        raise
    _fsync_dir(path.parent)


def check_format(payload: Any, path: str | Path | None = None) -> None:
    """Refuse dicts that were not written by :func:`save_checkpoint` / ``Trainer.state_dict``."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{_where(path)} is not a secateurs training checkpoint (no {FORMAT!r} tag); "
            "pass a file written by Trainer / save_checkpoint"
        )
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{_where(path)} has format version {version!r} but this secateurs reads up to "
            f"{FORMAT_VERSION}; upgrade secateurs or use a checkpoint written by this version"
        )


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`.

    It unpickles arbitrary objects (optimizer, sparsifier and data states), so only
    load files you wrote yourself.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {str(path)!r}; check the path")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:
        raise CheckpointError(
            f"{_where(path)} is corrupted or truncated ({type(err).__name__}: {err}); delete it and "
            "resume from an earlier checkpoint, or restart training without it"
        ) from err
    check_format(payload, path)
    return payload


def _describe_differences(model_sd: Mapping[str, torch.Tensor], ckpt_sd: Mapping[str, Any]) -> list[str]:
    missing = [k for k in model_sd if k not in ckpt_sd]
    unexpected = [k for k in ckpt_sd if k not in model_sd]
    shapes = [  # a module's extra state (e.g. MaskedReLU's mode) is no tensor: it has no shape to compare
        f"{k}: checkpoint {tuple(getattr(ckpt_sd[k], 'shape', ()))} vs model {tuple(getattr(v, 'shape', ()))}"
        for k, v in model_sd.items()
        if k in ckpt_sd and tuple(getattr(ckpt_sd[k], "shape", ())) != tuple(getattr(v, "shape", ()))
    ]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
            parts.append(f"{label} {items[:_MAX_LISTED]}{more}")
    return parts


def check_model_compatible(model: nn.Module, state_dict: Mapping[str, Any], path: str | Path | None = None) -> None:
    """Raise CheckpointError (touching nothing) if ``state_dict`` is not for ``model``."""
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{_where(path)} holds no model state dict; it is not a training checkpoint")
    parts = _describe_differences(model.state_dict(), state_dict)
    if parts:
        raise CheckpointError(
            f"{_where(path)} is from a different model: {'; '.join(parts)}. "
            "Build the same model (architecture and sizes) that wrote it, or start without resuming."
        )


def rng_state() -> dict:
    """Every global RNG a training step may draw from (dropout, augmentation, shuffling)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured; a CUDA state is skipped on a CPU-only host."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [torch.as_tensor(s, dtype=torch.uint8).cpu() for s in state["cuda"]]
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
