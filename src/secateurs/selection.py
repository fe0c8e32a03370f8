"""Exact top-k selection: the primitive under every prune.

Exactness matters: "90% sparse" must mean exactly ``n - round(0.9 n)`` weights kept, ties
included. Ties are broken towards the lowest flat index, so results are deterministic.
On CPU the k-th value comes from numpy's introselect (O(n); faster than ``torch.topk`` and
``torch.kthvalue`` on CPU, see ``benchmarks/bench_masks.py``); on accelerators ``torch.topk`` runs a radix select on device.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import ConfigError


def kth_largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of a 1-D tensor (1 <= k <= numel), as a 0-d tensor."""
    n = flat.numel()
    if flat.device.type == "cpu":
        arr = flat.detach()
        if arr.dtype not in (torch.float32, torch.float64):
            arr = arr.float()
        value = np.partition(arr.numpy(), n - k)[n - k]
        return torch.tensor(value, dtype=flat.dtype)
    return torch.topk(flat, k, sorted=False).values.min()


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the same shape with exactly ``k`` True at the highest scores."""
    n = scores.numel()
    if not 0 <= k <= n:
        raise ConfigError(f"cannot keep {k} of {n} elements")
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k == n:
        return torch.ones_like(scores, dtype=torch.bool)
    flat = scores.reshape(-1)
    if torch.isnan(flat).any():
        raise ConfigError("scores contain NaN; check the model's weights or the score's inputs")
    threshold = kth_largest(flat, k).to(flat.device)
    return select_at_threshold(flat, threshold, k).view_as(scores)


def count(mask: torch.Tensor) -> int:
    """True elements of a bool tensor (``count_nonzero`` avoids the int64 reduction ``sum`` does)."""
    return int(torch.count_nonzero(mask))


def select_at_threshold(flat: torch.Tensor, threshold: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` elements of ``flat`` that are >= ``threshold`` (the k-th largest value),
    ties at the threshold taken lowest index first."""
    chosen = flat >= threshold
    surplus = count(chosen) - k
    if surplus == 0:  # no ties at the threshold: the common case, one pass
        return chosen
    tied = torch.nonzero(flat == threshold).squeeze(1)
    chosen[tied[tied.numel() - surplus:]] = False  # drop the highest-index ties
    return chosen
