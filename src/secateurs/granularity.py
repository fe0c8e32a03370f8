"""Granularity: N:M fine-grained structured sparsity.

N:M sparsity keeps ``n`` of every ``m`` consecutive weights along a layer's input dimension.
NVIDIA's sparse tensor cores (Ampere and newer) execute the 2:4 pattern at up to twice the
dense math throughput, and a network pruned to 2:4 by magnitude and fine-tuned recovers its
dense accuracy (Mishra et al. 2021, "Accelerating sparse deep neural networks": train dense,
prune 2:4 by magnitude, retrain with the mask). General N:M (1:4, 2:8, 4:8, ...) is trainable the same way (Zhou et al.
2021, "Learning N:M fine-grained structured sparse neural networks from scratch").

Layout. A group is ``m`` consecutive entries of one output's row of inputs,
:func:`secateurs.layers.as_rows` (``weight.reshape(out, -1)`` when dimension 0 is the output,
as for Linear and Conv; transformers' ``Conv1D`` stores ``[in, out]`` and is transposed first): along ``in`` for a Linear ``[out, in]`` and along the
flattened ``in * kh * kw`` (PyTorch's contiguous order: channel-major, then kernel rows and
columns) for a Conv ``[out, in, kh, kw]``. That row is the one a convolution lowered to a GEMM
(``unfold``) multiplies, so one rule serves every layer type. NVIDIA's ASP permutes conv
weights to ``[out, kh, kw, in]`` first, so that groups run along channels for channels-last
sparse convolution kernels: masks made here are a valid N:M pattern for that GEMM but not
ASP's pattern. A transposed convolution's weight is ``[in, out, ...]``; it is not prunable by
default, and its groups would run along the outputs.

The masks are ordinary element masks in the sparsity state (:class:`~secateurs.masks.Masks`),
so training with them costs what unstructured masks cost; the fast kernels are used only after
:func:`to_semi_structured` exports the 2:4 Linear weights for inference on a GPU.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from .errors import ConfigError, SparsityMismatchError
from .layers import as_rows, fan_in, from_rows
from .masks import Masks, unwrap_model
from .scores import magnitude
from .validate import check_int

__all__ = [
    "check_nm_config", "nm_compatible", "nm_mask", "nm_masks", "check_nm", "assert_nm",
    "to_semi_structured",
]


# -- the pattern: pure functions ------------------------------------------------------------
def check_nm_config(n: int, m: int) -> tuple[int, int]:
    """``(n, m)`` if ``1 <= n < m`` are ints; a :class:`ConfigError` otherwise.

    ``n == m`` would keep every weight (a dense layer: exclude it instead) and ``n == 0`` every
    layer's whole row of weights would go."""
    for what, value in (("n", n), ("m", m)):
        check_int(value, f"N:M sparsity's {what}", hint="e.g. n=2, m=4")
    if not 1 <= n < m:
        raise ConfigError(
            f"N:M sparsity keeps n of every m weights and needs 1 <= n < m, got n={n}, m={m}; "
            "e.g. n=2, m=4 (50% sparse, accelerated on Ampere GPUs); to keep a layer dense, exclude it"
        )
    return n, m


def _fan_in(shape: torch.Size | Sequence[int], output_axis: int = 0) -> int:
    return fan_in(shape, output_axis)


def nm_compatible(shape: torch.Size | Sequence[int], m: int, output_axis: int = 0) -> bool:
    """Whether a weight of ``shape`` splits into groups of ``m`` along its input dimension."""
    return len(shape) >= 2 and _fan_in(shape, output_axis) % m == 0


def _groups(t: torch.Tensor, m: int, name: str, output_axis: int = 0) -> torch.Tensor:
    """``t`` as ``[out, fan_in // m, m]`` (rows per output unit, whatever the layout), or a
    ConfigError naming the layer."""
    if t.dim() < 2:
        raise ConfigError(
            f"{name} has shape {tuple(t.shape)}: N:M groups run along the input dimension of a weight "
            "[out, in] or [out, in, *kernel]; exclude this parameter from N:M pruning"
        )
    per_output = _fan_in(t.shape, output_axis)
    if per_output % m:
        raise ConfigError(
            f"{name} has shape {tuple(t.shape)} with {per_output} inputs per output (in * kernel size), "
            f"not divisible by m={m}; exclude it (exclude=[{name!r}] or keep_dense=[{name!r}]) "
            f"or pick an m that divides {per_output}"
        )
    return as_rows(t, output_axis).reshape(t.shape[output_axis], per_output // m, m)


def nm_mask(scores: torch.Tensor, n: int, m: int, *, name: str = "weight", output_axis: int = 0) -> torch.Tensor:
    """Bool mask keeping the ``n`` highest scores of every ``m`` consecutive inputs.

    Ties go to the lowest input index (a stable sort), as in :func:`secateurs.selection.topk_mask`,
    so the mask is deterministic on any device; ``-inf`` marks entries to keep only when a group
    has too few others. ``output_axis`` is the axis of output units (1 for transformers'
    ``Conv1D``, stored ``[in, out]``): groups always run along the inputs. ``name`` only labels
    errors.
    """
    check_nm_config(n, m)
    groups = _groups(scores.detach(), m, name, output_axis).float()
    if torch.isnan(groups).any():
        raise ConfigError(f"scores of {name} contain NaN; check the model's weights or the score's inputs")
    top = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=groups.device).scatter_(-1, top, True)
    return from_rows(keep, scores.shape, output_axis)


def nm_masks(
    weights: Mapping[str, torch.Tensor],
    n: int,
    m: int,
    scores: Mapping[str, torch.Tensor] | None = None,
    output_axes: Mapping[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """N:M masks for many layers, by ``scores`` (default: magnitude ``|w|``, as in Mishra et
    al. 2021). Every layer must split into groups of ``m``; the error lists all that do not.
    ``output_axes`` gives each weight's output axis (default 0; see :mod:`secateurs.layers`)."""
    check_nm_config(n, m)
    axes = {k: (output_axes or {}).get(k, 0) for k in weights}
    bad = [f"{k} {tuple(w.shape)}" for k, w in weights.items() if not nm_compatible(w.shape, m, axes[k])]
    if bad:
        raise ConfigError(
            f"N:M needs every layer's inputs per output (in * kernel size) divisible by m={m}; "
            f"these are not: {', '.join(bad[:6])}; leave them out or pick another m"
        )
    scores = magnitude(weights) if scores is None else scores
    return {k: nm_mask(scores[k], n, m, name=k, output_axis=axes[k]) for k in weights}


def check_nm(mask: torch.Tensor, n: int, m: int, output_axis: int = 0) -> bool:
    """Whether ``mask`` keeps exactly ``n`` of every ``m`` consecutive inputs.

    Exactly, not at most: the hardware needs at most ``n`` non-zeros per group, which any
    weight under such a mask satisfies, and masks made here always hold ``n``."""
    check_nm_config(n, m)
    if not nm_compatible(mask.shape, m, output_axis):
        return False
    kept = _groups(mask, m, "mask", output_axis).sum(dim=-1, dtype=torch.int64)
    return bool((kept == n).all())


def assert_nm(mask: torch.Tensor, n: int, m: int, name: str = "mask", output_axis: int = 0) -> None:
    """Raise :class:`SparsityMismatchError` naming ``name`` and its first bad group unless
    ``mask`` is exactly N:M."""
    check_nm_config(n, m)
    if not nm_compatible(mask.shape, m, output_axis):
        raise SparsityMismatchError(
            f"{name} of shape {tuple(mask.shape)} cannot be {n}:{m} sparse: its inputs per output "
            f"are not a whole number of groups of {m}"
        )
    kept = _groups(mask, m, name, output_axis).sum(dim=-1, dtype=torch.int64)
    wrong = torch.nonzero(kept != n)
    if wrong.numel():
        row, group = (int(i) for i in wrong[0])
        raise SparsityMismatchError(
            f"{name} is not {n}:{m} sparse: output {row}, inputs {group * m}..{group * m + m - 1} "
            f"(flattened) keep {int(kept[row, group])}, expected {n}; {wrong.shape[0]} of "
            f"{kept.numel()} groups differ"
        )


# -- training with N:M masks ----------------------------------------------------------------
_SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def _needs_gpu(why: str) -> ConfigError:
    return ConfigError(
        f"to_semi_structured needs {why}: 2:4 semi-structured sparse kernels (cuSPARSELt / CUTLASS) run "
        "only on NVIDIA GPUs with compute capability >= 8.0 (Ampere or newer; Mishra et al. 2021). "
        "Move the model there first, e.g. model.to('cuda', torch.float16); on a CPU keep the masked dense model"
    )


def _linear_weights(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        f"{name}.weight" if name else "weight": module
        for name, module in unwrap_model(model).named_modules()
        if isinstance(module, nn.Linear)
    }


def to_semi_structured(
    model: nn.Module, masks: Masks | Mapping[str, torch.Tensor] | None = None
) -> list[str]:
    """Replace 2:4-sparse Linear weights by ``torch.sparse`` semi-structured tensors, in place,
    for inference; returns the converted parameter names.

    With ``masks`` (a :class:`~secateurs.masks.Masks`, e.g. ``NMSparsifier(...).masks``, or a
    name -> bool mapping) every Linear weight named there must be exactly 2:4
    (:func:`assert_nm`); names of other layers (convolutions) are left dense. Without masks,
    every Linear whose weight has at most 2 non-zeros per group of 4 is converted. The weights
    must be fp16 or bf16 on a CUDA device of compute capability >= 8.0, and each layer's shape
    must meet the kernels' minimum sizes; nothing is changed unless every layer converts.
    The converted model is for inference only (no gradients flow to the sparse weights).
    """
    linears = _linear_weights(model)
    if masks is None:
        chosen: dict[str, torch.Tensor | None] = dict.fromkeys(linears)
    else:
        table = masks.masks if isinstance(masks, Masks) else masks
        chosen = {k: table[k] for k in table if k in linears}
        if not chosen:
            raise ConfigError("none of the masked parameters is a Linear weight; only nn.Linear layers convert")
    for k in chosen:
        w = linears[k].weight
        if w.device.type != "cuda":
            raise _needs_gpu(f"CUDA weights ({k} is on {w.device})")
        if torch.cuda.get_device_capability(w.device) < (8, 0):
            raise _needs_gpu(f"an Ampere or newer GPU ({torch.cuda.get_device_name(w.device)} is older)")
        if w.dtype not in _SEMI_STRUCTURED_DTYPES:
            raise ConfigError(
                f"{k} is {w.dtype}; semi-structured weights must be float16 or bfloat16: "
                "cast the model first, e.g. model.half()"
            )
    try:
        from torch.sparse import to_sparse_semi_structured
    except ImportError as exc:  # torch < 2.1
        raise ConfigError(
            f"this torch ({torch.__version__}) has no semi-structured sparsity; use torch >= 2.1"
        ) from exc

    converted = {}
    with torch.no_grad():
        for k, mask in chosen.items():
            w = linears[k].weight.detach()
            if mask is None:
                if not nm_compatible(w.shape, 4) or not bool(
                    (_groups(w != 0, 4, k).sum(-1) <= 2).all()
                ):
                    continue  # not 2:4 sparse: stays dense
                dense = w.contiguous()
            else:
                assert_nm(mask, 2, 4, name=k)
                dense = (w * mask.to(device=w.device, dtype=w.dtype)).contiguous()
            try:
                converted[k] = to_sparse_semi_structured(dense)
            except (RuntimeError, ValueError) as exc:
                raise ConfigError(f"{k} of shape {tuple(w.shape)} cannot be made semi-structured: {exc}") from exc
    if not converted:
        raise ConfigError(
            "no Linear weight is 2:4 sparse; prune with NMSparsifier(model, n=2, m=4) and fine-tune first"
        )
    for k, sparse in converted.items():
        linears[k].weight = nn.Parameter(sparse, requires_grad=False)
    return list(converted)
