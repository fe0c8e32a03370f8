"""Save a compact model so that loading needs only torch: no model class, no secateurs.

We use ``torch.export`` (an ahead-of-time graph of ATen ops, serialised with its weights)
rather than TorchScript, which is deprecated and cannot script the fx ``GraphModule`` that
replaces an option-A shortcut. The export is for inference: it is taken in eval mode, so
BatchNorm uses its running statistics; the batch dimension stays dynamic.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Union

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..outputs import logits_of

__all__ = ["save_compact", "load_compact"]

PathLike = Union[str, "os.PathLike[str]"]


class _Predict(nn.Module):
    """The model with a mapping output (a Hugging Face ``ModelOutput``, which carries caches and
    optional fields an exported program should not) or an object with ``.logits`` reduced to
    the logits; a tensor, tuple or list output is exported whole."""

    def __init__(self, model: nn.Module, keys: tuple[str, ...] = ()):
        super().__init__()
        self.model = model
        self.keys = keys  # keyword inputs, passed positionally in this order

    def forward(self, *args):
        out = self.model(**dict(zip(self.keys, args))) if self.keys else self.model(*args)
        return logits_of(out) if isinstance(out, Mapping) or hasattr(out, "logits") else out


def _batched(t: torch.Tensor) -> torch.Tensor:
    return (t if t.shape[0] > 1 else t.expand(2, *t.shape[1:])).contiguous()


def save_compact(model: nn.Module, path: PathLike, example_input) -> None:
    """Export ``model`` (eval mode) for inputs shaped like ``example_input`` (a tensor, a tuple
    of tensors, or a mapping of keyword tensors such as ``{"input_ids": ...}``) with any batch
    size. A mapping output (a Hugging Face ``ModelOutput``) is saved as its logits; a tuple is
    saved whole. Keyword inputs become positional in the mapping's order: the loaded module is
    called ``m(input_ids, attention_mask)`` for ``{"input_ids": ..., "attention_mask": ...}``."""
    batch = torch.export.Dim("batch")
    keys: tuple[str, ...] = ()
    if isinstance(example_input, torch.Tensor):
        args = (_batched(example_input),)
    elif isinstance(example_input, (tuple, list)):
        args = tuple(_batched(t) for t in example_input)
    elif isinstance(example_input, dict):
        keys, args = tuple(example_input), tuple(_batched(v) for v in example_input.values())
    else:
        raise ConfigError(f"example_input must be a tensor, a tuple of tensors or a dict of tensors, got {type(example_input).__name__}")
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        program = torch.export.export(
            _Predict(model, keys), args, dynamic_shapes={"args": tuple({0: batch} for _ in args)}
        )
    except Exception as err:
        raise ConfigError(
            f"torch.export could not capture {type(model).__name__} ({type(err).__name__}: {err}); "
            f"check that example_input matches the model"
        ) from err
    finally:
        for m, mode in modes.items():
            m.training = mode
    torch.export.save(program, os.fspath(path))


def load_compact(path: PathLike) -> nn.Module:
    """The saved model as a callable ``nn.Module`` (equivalent to
    ``torch.export.load(path).module()``, which is all a user without secateurs needs)."""
    return torch.export.load(os.fspath(path)).module()
