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
