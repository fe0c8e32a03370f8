"""The engine's invariants: exact counts, monotone pruning, deterministic ties."""
import math

import pytest
import torch

from secateurs.engine import prune
from secateurs.errors import ConfigError
from secateurs.selection import topk_mask


@pytest.mark.parametrize("n,k", [(1, 0), (1, 1), (10, 3), (1000, 1), (1000, 999), (4097, 2048)])
def test_topk_mask_keeps_exactly_k_highest(n, k):
    scores = torch.randn(n)
    mask = topk_mask(scores, k)
    assert int(mask.sum()) == k
    if 0 < k < n:
        assert scores[mask].min() >= scores[~mask].max()


def test_topk_mask_breaks_ties_by_lowest_index():
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5, 2.0])
    assert topk_mask(scores, 3).tolist() == [False, True, True, True, False, False]


def test_topk_mask_all_equal_scores_still_exact():
    mask = topk_mask(torch.zeros(100, 7), 123)
    assert int(mask.sum()) == 123 and mask.reshape(-1)[:123].all()


def test_topk_mask_rejects_nan():
    with pytest.raises(ConfigError, match="NaN"):
        topk_mask(torch.tensor([1.0, math.nan, 0.0]), 1)


def test_prune_is_monotone_and_exact():
    g = torch.Generator().manual_seed(1)
    masks = {"a": torch.rand(50, 20, generator=g) > 0.3, "b": torch.rand(30, generator=g) > 0.5}
    scores = {"a": torch.randn(50, 20, generator=g), "b": torch.randn(30, generator=g)}
    keep = {"a": 200, "b": 5}
    new = prune(masks, scores, keep)
    for name in masks:
        assert int(new[name].sum()) == keep[name]
        assert not (new[name] & ~masks[name]).any(), "prune revived a weight"
        # kept = highest scores among the previously active
        kept, dropped = scores[name][new[name]], scores[name][masks[name] & ~new[name]]
        assert kept.min() >= dropped.max()


def test_prune_refuses_to_revive():
    masks = {"a": torch.tensor([True, False, False])}
    with pytest.raises(ConfigError, match="never revives"):
        prune(masks, {"a": torch.ones(3)}, {"a": 2})
