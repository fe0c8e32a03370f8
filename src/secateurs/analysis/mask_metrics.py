"""Mask analysis: how alike two masks are, how much is left, and how far training moved.

Every function returns the same shape as :meth:`secateurs.masks.Masks.stats`: the totals at
the top level and one dict per layer under ``"layers"``, with the same keys, e.g.::

    {"iou": 0.5, "intersection": 3, "union": 6,
     "layers": {"fc1.weight": {"iou": 0.5, "intersection": 3, "union": 6}}}

Totals are computed from summed counts (a big layer weighs more), never as a mean of the
per-layer values. Masks may be ``{name: bool tensor}`` mappings or
:class:`~secateurs.masks.Masks` objects.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from ..errors import ConfigError


def _masks(m) -> Mapping[str, torch.Tensor]:
    return getattr(m, "masks", m)


def _matched(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], what: str) -> list[str]:
    """The shared layer names in ``a``'s order, after checking that names and shapes agree."""
    only_a = [n for n in a if n not in b]
    only_b = [n for n in b if n not in a]
    if only_a or only_b:
        raise ConfigError(
            f"{what}: the layer names differ (only in the first: {', '.join(only_a[:4]) or '-'}; only in "
            f"the second: {', '.join(only_b[:4]) or '-'}); compare masks or weights of the same model"
        )
    for n in a:
        if a[n].shape != b[n].shape:
            raise ConfigError(
                f"{what}: {n} is {tuple(a[n].shape)} in the first and {tuple(b[n].shape)} in the second; "
                "compare masks or weights of the same model"
            )
    return list(a)


def _count(t: torch.Tensor) -> int:
    return int(torch.count_nonzero(t))


def mask_iou(a, b) -> dict:
    """Intersection over union ``|a ∧ b| / |a ∨ b|`` of two masks' kept sets, per layer and
    total (1.0 when both are empty): the overlap measure used to ask whether different runs
    or criteria find the same ticket (e.g. Zhou et al. 2019; Frankle et al. 2020).

    Returns ``{"iou", "intersection", "union", "layers": {name: {same keys}}}``.
    """
    a, b = _masks(a), _masks(b)
    layers: dict[str, dict] = {}
    for n in _matched(a, b, "mask_iou"):
        x, y = a[n].bool(), b[n].to(a[n].device).bool()
        inter, union = _count(x & y), _count(x | y)
        layers[n] = {"iou": inter / union if union else 1.0, "intersection": inter, "union": union}
    inter = sum(v["intersection"] for v in layers.values())
    union = sum(v["union"] for v in layers.values())
    return {"iou": inter / union if union else 1.0, "intersection": inter, "union": union, "layers": layers}


def mask_hamming(a, b) -> dict:
    """Normalised Hamming distance (fraction of positions where two masks differ), per layer
    and total, with the counts behind it; 0.0 for layers without elements.

    Returns ``{"distance", "differ", "numel", "layers": {name: {same keys}}}``.
    """
    a, b = _masks(a), _masks(b)
    layers: dict[str, dict] = {}
    for n in _matched(a, b, "mask_hamming"):
        differ, numel = _count(a[n].bool() ^ b[n].to(a[n].device).bool()), a[n].numel()
        layers[n] = {"distance": differ / numel if numel else 0.0, "differ": differ, "numel": numel}
    differ = sum(v["differ"] for v in layers.values())
    numel = sum(v["numel"] for v in layers.values())
    return {"distance": differ / numel if numel else 0.0, "differ": differ, "numel": numel, "layers": layers}


def remaining_weights(masks) -> dict:
    """Fraction of weights kept (density), per layer and total -- the x axis of most
    lottery-ticket plots (Frankle & Carbin 2019).

    Returns ``{"fraction", "remaining", "numel", "layers": {name: {same keys}}}``.
    """
    layers: dict[str, dict] = {}
    for n, m in _masks(masks).items():
        kept, numel = _count(m.bool()), m.numel()
        layers[n] = {"fraction": kept / numel if numel else 0.0, "remaining": kept, "numel": numel}
    kept = sum(v["remaining"] for v in layers.values())
    numel = sum(v["numel"] for v in layers.values())
    return {"fraction": kept / numel if numel else 0.0, "remaining": kept, "numel": numel, "layers": layers}


def learning_distance(
    initial: Mapping[str, torch.Tensor],
    final: Mapping[str, torch.Tensor],
    masks=None,
) -> dict:
    """The ℓ2 distance ``||θ_final - θ_init||₂``, per tensor and total (the square root of the
    summed squares), which He et al. (2022, "Sparse Double Descent") track against test
    accuracy: sparser networks stay closer to their initialisation.

    ``initial`` and ``final`` must hold the same names and shapes. With ``masks``, a tensor
    that has a mask counts only its kept positions; tensors without one (e.g. biases) count
    in full; a mask for a name not in ``final`` is an error. Sums are taken in float64.

    Returns ``{"distance", "numel", "layers": {name: {same keys}}}``, ``numel`` being the
    number of entries counted.
    """
    names = _matched(final, initial, "learning_distance")
    masks = {} if masks is None else _masks(masks)
    stray = [n for n in masks if n not in final]
    if stray:
        raise ConfigError(
            f"learning_distance: masks for {', '.join(stray[:4])}, which the weights do not hold; "
            "pass masks of the same model as the weights"
        )
    layers: dict[str, dict] = {}
    sums: list[float] = []
    for n in names:
        diff = final[n].detach().double() - initial[n].detach().to(final[n].device).double()
        if n in masks:
            mask = masks[n]
            if mask.shape != diff.shape:
                raise ConfigError(
                    f"learning_distance: the mask of {n} is {tuple(mask.shape)} but the weights are "
                    f"{tuple(diff.shape)}; pass masks of the same model as the weights"
                )
            diff = diff[mask.to(diff.device).bool()]
        sq = float(diff.square().sum())
        sums.append(sq)
        layers[n] = {"distance": math.sqrt(sq), "numel": diff.numel()}
    return {
        "distance": math.sqrt(sum(sums)),
        "numel": sum(v["numel"] for v in layers.values()),
        "layers": layers,
    }
