"""Allocation: global threshold, uniform, ERK / ER with redistribution, fixed layers."""
import math

import pytest
import torch

from secateurs.allocation import allocate, check_sparsity, erk_densities, keep_count
from secateurs.errors import ConfigError, UnknownNameError


def _layers():
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(16, 3, 3, 3, generator=g),
        "fc1.weight": torch.randn(300, 784, generator=g),
        "fc2.weight": torch.randn(10, 300, generator=g),
    }


def _active(scores):
    return {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, math.nan, "0.5"])
def test_sparsity_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        check_sparsity(bad)


@pytest.mark.parametrize("scope", ["global", "erk", "er"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.98])
def test_total_budget_is_exact(scope, sparsity):
    scores = {n: s.abs() for n, s in _layers().items()}
    keep = allocate(scope, scores, _active(scores), sparsity)
    total = sum(s.numel() for s in scores.values())
    assert sum(keep.values()) == keep_count(total, sparsity)
    assert all(0 < keep[n] <= s.numel() for n, s in scores.items())


def test_global_threshold_matches_sorting():
    scores = {n: s.abs() for n, s in _layers().items()}
    keep = allocate("global", scores, _active(scores), 0.9)
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    threshold = flat.sort(descending=True).values[sum(keep.values()) - 1]
    for n, s in scores.items():
        assert keep[n] == int((s >= threshold).sum())


def test_uniform_keeps_same_fraction_per_layer():
    scores = _layers()
    keep = allocate("uniform", scores, _active(scores), 0.8)
    assert keep == {n: s.numel() - round(0.8 * s.numel()) for n, s in scores.items()}


def test_erk_density_proportional_to_sum_over_product_of_dims():
    shapes = {"a": (64, 32, 3, 3), "b": (128, 64, 3, 3), "c": (10, 512)}
    total = sum(math.prod(s) for s in shapes.values())
    d = erk_densities(shapes, keep=int(0.1 * total))
    raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    ratios = [d[n] / raw[n] for n in shapes if d[n] < 1]
    assert max(ratios) == pytest.approx(min(ratios))
    assert sum(d[n] * math.prod(shapes[n]) for n in shapes) == pytest.approx(int(0.1 * total))


def test_erk_redistributes_when_a_layer_would_exceed_density_one():
    # A tiny first layer would get density > 1 at 50% overall: it becomes dense and the
    # big layer absorbs the rest of the budget.
    shapes = {"tiny": (4, 1, 3, 3), "big": (512, 512)}
    total = sum(math.prod(s) for s in shapes.values())
    keep = total // 2
    d = erk_densities(shapes, keep)
    assert d["tiny"] == 1.0
    assert d["big"] * 512 * 512 == pytest.approx(keep - 36)


def test_er_ignores_kernel_dims():
    shapes = {"a": (8, 4, 5, 5), "b": (8, 4, 1, 1)}
    d = erk_densities(shapes, keep=100, kernel=False)
    assert d["a"] == pytest.approx(d["b"])


def test_keep_dense_and_overrides_are_respected_and_total_exact():
    scores = {n: s.abs() for n, s in _layers().items()}
    total = sum(s.numel() for s in scores.values())
    keep = allocate("global", scores, _active(scores), 0.9, fixed_sparsity={"conv.weight": 0.0, "fc2.weight": 0.5})
    assert keep["conv.weight"] == 432 and keep["fc2.weight"] == 1500
    assert sum(keep.values()) == keep_count(total, 0.9)


def test_erk_target_unreachable_is_a_clear_error():
    scores = _layers()
    with pytest.raises(ConfigError, match="cannot reach sparsity"):
        # keeping fc1 dense already exceeds a 99% budget
        allocate("erk", scores, _active(scores), 0.99, fixed_sparsity={"fc1.weight": 0.0})


def test_layer_collapse_is_an_error_unless_allowed():
    scores = {"a": torch.full((1000,), 10.0), "b": torch.full((10,), 0.1)}
    with pytest.raises(ConfigError, match="removes every weight of b"):
        allocate("global", scores, _active(scores), 0.5)
    keep = allocate("global", scores, _active(scores), 0.5, allow_layer_collapse=True)
    assert keep == {"a": 505, "b": 0}


def test_unknown_scope_lists_known():
    with pytest.raises(UnknownNameError, match="unknown scope 'local'; known scopes: global, uniform, erk, er"):
        allocate("local", _layers(), _active(_layers()), 0.5)
    # 'layerwise' (IMP's and structured pruning's old name of the same thing) reads as 'uniform'
    assert allocate("layerwise", _layers(), _active(_layers()), 0.5) == allocate("uniform", _layers(), _active(_layers()), 0.5)
