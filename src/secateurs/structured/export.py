"""Save a compact model so that loading needs only torch: no model class, no secateurs.

We use ``torch.export`` (an ahead-of-time graph of ATen ops, serialised with its weights)
rather than TorchScript, which is deprecated and cannot script the fx ``GraphModule`` that
replaces an option-A shortcut. The export is for inference: it is taken in eval mode, so
BatchNorm uses its running statistics; the batch dimension stays dynamic.
"""
from __future__ import annotations

import os
from typing import Union

import torch
import torch.nn as nn

from ..errors import ConfigError

__all__ = ["save_compact", "load_compact"]

PathLike = Union[str, "os.PathLike[str]"]


def save_compact(model: nn.Module, path: PathLike, example_input: torch.Tensor) -> None:
    """Export ``model`` (eval mode) for inputs shaped like ``example_input`` with any batch."""
    example = example_input if example_input.shape[0] > 1 else example_input.expand(2, *example_input.shape[1:])
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        program = torch.export.export(
            model, (example.contiguous(),), dynamic_shapes=({0: torch.export.Dim("batch")},)
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
