"""Prunable layers by role, not by class: which module types own a prunable weight, and which
axis of that weight indexes the layer's outputs.

Every consumer of a weight's layout asks here: N:M groups run along the input axis, FLOPs
count ``outputs x fan_in``, unit-level scores read rows per output. ``nn.Linear`` and
``nn.Conv1d/2d/3d`` store ``[out, in, *kernel]`` (output axis 0); Hugging Face
``transformers``' ``Conv1D`` (GPT-2's attention and MLP projections) stores ``[in, out]``
(output axis 1). A user's own layer type is one call::

    secateurs.register_layer(MyLinear, output_axis=0)

Optional dependencies are registered by their qualified class name, so this module never
imports them: a model that uses ``transformers.pytorch_utils.Conv1D`` is recognised whether or
not anything else here knows about ``transformers``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .errors import ConfigError
from .validate import check_int

__all__ = [
    "LayerType", "register_layer", "layer_type", "class_layer_type", "registered_layers", "PruningNotice",
    "as_rows", "from_rows", "fan_in", "notice",
]


class PruningNotice(UserWarning):
    """Something was left out or kept dense on purpose: the notice says what and how to change it."""


def notice(message: str) -> None:
    """Emit one :class:`PruningNotice` (shown once per call site and message by default)."""
    warnings.warn(message, PruningNotice, stacklevel=3)


@dataclass(frozen=True)
class LayerType:
    """How a prunable module's weight is laid out.

    ``output_axis`` indexes the output units (0 for ``[out, in, ...]``, 1 for ``[in, out]``);
    every other axis is part of one output's fan-in, in the weight's memory order.
    """

    name: str
    output_axis: int = 0
    param: str = "weight"


_BY_CLASS: dict[type, LayerType] = {}
_BY_QUALNAME: dict[str, LayerType] = {}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_layer(cls: type | str, *, output_axis: int = 0, param: str = "weight") -> LayerType:
    """Make a module type prunable: its ``param`` (default ``weight``) gets a mask, with outputs
    along ``output_axis``. ``cls`` is a class, or a qualified class name
    (``"package.module.Class"``) to register a type without importing its package.
    Subclasses of a registered class are covered too."""
    check_int(output_axis, "register_layer: output_axis", minimum=0)
    if isinstance(cls, str):
        kind = LayerType(cls, output_axis, param)
        _BY_QUALNAME[cls] = kind
    elif isinstance(cls, type) and issubclass(cls, nn.Module):
        kind = LayerType(cls.__name__, output_axis, param)
        _BY_CLASS[cls] = kind
    else:
        raise ConfigError(f"register_layer needs an nn.Module subclass or a 'package.module.Class' name, got {cls!r}")
    return kind


for _cls in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_layer(_cls, output_axis=0)
# GPT-2, GPT-Neo's relatives, CTRL, ...: y = x @ W + b with W stored [in, out]
register_layer("transformers.pytorch_utils.Conv1D", output_axis=1)
register_layer("transformers.modeling_utils.Conv1D", output_axis=1)  # older transformers releases


def class_layer_type(cls: type) -> LayerType | None:
    """The registered type of modules of class ``cls`` (walking its hierarchy), or None."""
    for c in cls.__mro__:
        kind = _BY_CLASS.get(c) or _BY_QUALNAME.get(_qualname(c))
        if kind is not None:
            return kind
    return None


def layer_type(module: nn.Module) -> LayerType | None:
    """The registered type of ``module``, or None."""
    return class_layer_type(type(module))


def registered_layers() -> list[str]:
    """Names of the registered layer types (for messages and ``secateurs list``)."""
    return sorted({k.name for k in (*_BY_CLASS.values(), *_BY_QUALNAME.values())})


def fan_in(shape: torch.Size | Iterable[int], output_axis: int = 0) -> int:
    """Inputs per output unit: every element of the weight that is not on the output axis."""
    shape = tuple(shape)
    total = 1
    for i, s in enumerate(shape):
        if i != output_axis:
            total *= s
    return total


def as_rows(t: torch.Tensor, output_axis: int = 0) -> torch.Tensor:
    """``t`` as ``[outputs, fan_in]``: one row per output unit, inputs in memory order (a
    ``[in, out]`` weight is transposed). A view for output axis 0, a copy otherwise."""
    if t.dim() < 2:
        raise ConfigError(f"a weight of shape {tuple(t.shape)} has no input axis; only matrices and kernels have rows")
    return t.movedim(output_axis, 0).reshape(t.shape[output_axis], -1)


def from_rows(rows: torch.Tensor, shape: torch.Size, output_axis: int = 0) -> torch.Tensor:
    """Inverse of :func:`as_rows` for a tensor of ``shape``."""
    moved = [shape[output_axis], *(s for i, s in enumerate(shape) if i != output_axis)]
    return rows.reshape(moved).movedim(0, output_axis).contiguous()


def unregistered_matrix_modules(model: nn.Module) -> list[tuple[str, str]]:
    """``(parameter name, module class)`` of matrix or kernel weights (parameters of 2+ dims
    whose name ends in ``weight``) that no registered layer owns as its weight: a
    ``MultiheadAttention``'s ``in_proj_weight``, a ``Bilinear`` or a user's own layer.
    Embeddings are excluded (they are looked up, not multiplied)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            continue
        kind = layer_type(module)
        for p_name, p in module._parameters.items():
            if (
                isinstance(p, nn.Parameter)
                and p.dim() >= 2
                and p_name.endswith("weight")
                and (kind is None or p_name != kind.param)
            ):
                out.append((f"{name}.{p_name}" if name else p_name, type(module).__name__))
    return out
