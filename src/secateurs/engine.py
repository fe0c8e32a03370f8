"""The engine: pure functions from (masks, scores, counts) to new masks.

``prune`` is monotone (it never revives a weight), so iterating it along any schedule
can only shrink the active set; regrowth is a separate rule that conserves the count.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from .errors import ConfigError
from .selection import count, topk_mask


def prune(
    masks: Mapping[str, torch.Tensor],
    scores: Mapping[str, torch.Tensor],
    keep: Mapping[str, int],
) -> dict[str, torch.Tensor]:
    """New masks keeping, in each tensor, the ``keep[name]`` highest-scoring *active* units."""
    out: dict[str, torch.Tensor] = {}
    for name, mask in masks.items():
        k = keep[name]
        n_active = count(mask)
        if k > n_active:
            raise ConfigError(
                f"{name} has {n_active} active weights but the plan keeps {k}; pruning never "
                "revives weights (lower the sparsity target or use a regrowth method)"
            )
        if k == n_active:
            out[name] = mask.clone()
            continue
        score = scores[name].detach().float().masked_fill(~mask, -math.inf)
        out[name] = topk_mask(score, k)
    return out


def drop_and_grow(
    masks: Mapping[str, torch.Tensor],
    drop_scores: Mapping[str, torch.Tensor],
    grow_scores: Mapping[str, torch.Tensor],
    n: Mapping[str, int],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Swap ``n[name]`` connections per tensor: drop the lowest-``drop_scores`` active ones and
    grow the highest-``grow_scores`` ones among those that were *inactive before the drop*.

    Returns ``(new_masks, grown)``. The active count of every tensor is conserved, the grown
    set never contains a connection that was active (so a regrown weight is always a new
    one, and the dropped and grown sets are disjoint), and ties go to the lowest index.
    Tensors missing from ``n`` are left unchanged.
    """
    new_masks: dict[str, torch.Tensor] = {}
    grown: dict[str, torch.Tensor] = {}
    for name, mask in masks.items():
        k = int(n.get(name, 0))
        n_active = count(mask)
        n_inactive = mask.numel() - n_active
        if k < 0 or k > n_active or k > n_inactive:
            raise ConfigError(
                f"{name}: cannot swap {k} connections with {n_active} active and {n_inactive} "
                "inactive; the swap count must be between 0 and both (lower the drop fraction)"
            )
        if k == 0:
            new_masks[name] = mask.clone()
            grown[name] = torch.zeros_like(mask)
            continue
        drop = _finite(drop_scores[name], name, "drop").masked_fill(~mask, -math.inf)
        kept = topk_mask(drop, n_active - k)
        grow = _finite(grow_scores[name], name, "grow").masked_fill(mask, -math.inf)
        new = topk_mask(grow, k)
        grown[name] = new
        new_masks[name] = kept | new
    return new_masks, grown


def _finite(scores: torch.Tensor, name: str, kind: str) -> torch.Tensor:
    """Scores as float with infinities clamped, so that -inf stays reserved for "not a
    candidate" and an inactive connection can never lose to an active one in a tie."""
    scores = scores.detach().float()
    if torch.isnan(scores).any():
        raise ConfigError(f"{kind} scores of {name} contain NaN; check the gradients / weights they come from")
    info = torch.finfo(torch.float32)
    return scores.clamp(info.min, info.max)


#: Comparison groups: where weights compete for the kept places. "tensor": the whole tensor;
#: "row": each output unit's row of inputs (Wanda, Sun et al. 2024); ``(n, m)``: each block
#: of m consecutive inputs (N:M). "Global" competition across tensors is an allocation
#: (:func:`secateurs.allocation.allocate`), which then calls "tensor" per tensor.
GROUPS = ("tensor", "row")


def select(
    scores: torch.Tensor,
    sparsity: float,
    group: str | tuple[int, int] = "tensor",
    output_axis: int = 0,
    name: str = "weight",
) -> torch.Tensor:
    """Bool mask keeping the highest scores within each comparison ``group``, with exact
    counts in every group (``keep_count(group size, sparsity)``; N:M keeps exactly n) and ties
    to the lowest index. ``output_axis`` says which axis of the weight indexes outputs
    (see :mod:`secateurs.layers`)."""
    from .allocation import check_sparsity, keep_count
    from .granularity import check_nm_config, nm_mask
    from .layers import as_rows, from_rows

    if isinstance(group, tuple):
        n, m = check_nm_config(*group)
        if abs(sparsity - (1.0 - n / m)) > 1e-9:
            raise ConfigError(f"sparsity {sparsity} contradicts the {n}:{m} group, which prunes exactly {1 - n / m:g}")
        return nm_mask(scores, n, m, name=name, output_axis=output_axis)
    check_sparsity(sparsity)
    if group == "tensor":
        return topk_mask(scores.detach().float(), keep_count(scores.numel(), sparsity))
    if group != "row":
        raise ConfigError(f"unknown comparison group {group!r}; known: {', '.join(GROUPS)} or an (n, m) pair")
    rows = as_rows(scores.detach().float(), output_axis)
    if torch.isnan(rows).any():
        raise ConfigError(f"scores of {name} contain NaN; check the model's weights or the score's inputs")
    k = keep_count(rows.shape[1], sparsity)
    top = torch.sort(rows, dim=1, descending=True, stable=True).indices[:, :k]
    keep = torch.zeros(rows.shape, dtype=torch.bool, device=rows.device).scatter_(1, top, True)
    return from_rows(keep, scores.shape, output_axis)
