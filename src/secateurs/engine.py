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
