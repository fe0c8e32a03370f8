"""Kept-weight initialisations of Zhou et al. (2019): values on kept positions, zeros elsewhere."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs.errors import ConfigError, UnknownNameError
from secateurs.masks import Masks
from secateurs.resets import KEPT_INITS, init_kept_, reinitialize_, snapshot

NAMES = ("0.weight", "2.weight")


def _setup(seed: int = 0):
    """A tiny MLP, its saved init, 'trained' weights and hand-set masks (about half kept)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=g) * 2 - 1)
    init = snapshot(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    masks = {
        "0.weight": torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 0, 1]], dtype=torch.bool),
        "2.weight": torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool),
    }
    return model, init, masks


def _run(policy: str, seed: int = 7):
    model, init, masks = _setup()
    before = torch.get_rng_state()
    init_kept_(policy, model, masks, init, torch.Generator().manual_seed(seed))
    assert torch.equal(torch.get_rng_state(), before), "init_kept_ touched the global RNG"
    params = dict(model.named_parameters())
    return params, init, masks, model


@pytest.mark.parametrize("policy", KEPT_INITS.names())
def test_pruned_positions_exactly_zero_and_rng_untouched(policy):
    params, init, masks, _ = _run(policy)  # _run checks the global RNG state
    for n in NAMES:
        pruned = params[n].detach()[~masks[n]]
        assert (pruned == 0).all() and not torch.signbit(pruned).any()
        assert (params[n].detach()[masks[n]] != 0).all()
    # parameters without a mask (biases) are left alone
    assert not torch.equal(params["0.bias"].detach(), init["0.bias"])


@pytest.mark.parametrize("policy", KEPT_INITS.names())
def test_deterministic_for_the_same_seed(policy):
    a, *_ = _run(policy, seed=3)
    b, *_ = _run(policy, seed=3)
    c, *_ = _run(policy, seed=4)
    for n in NAMES:
        assert torch.equal(a[n], b[n])
    random = policy in ("reinit", "reinit_same_sign", "reshuffle", "random_sign")
    assert any(not torch.equal(a[n], c[n]) for n in NAMES) == random


def test_original_is_bit_equal_on_kept():
    params, init, masks, _ = _run("original")
    for n in NAMES:
        assert torch.equal(params[n].detach()[masks[n]], init[n][masks[n]])


def test_signed_constant():
    params, init, masks, _ = _run("signed_constant")
    for n in NAMES:
        kept = params[n].detach()[masks[n]]
        std = init[n].std(correction=0)
        assert torch.equal(kept.abs(), std.expand_as(kept))
        assert torch.equal(torch.sign(kept), torch.sign(init[n][masks[n]]))
    assert params[NAMES[0]].detach()[masks[NAMES[0]]].abs()[0] != params[NAMES[1]].detach()[masks[NAMES[1]]].abs()[0]


def test_reshuffle_permutes_kept_values_within_kept_positions():
    params, init, masks, _ = _run("reshuffle")
    moved = False
    for n in NAMES:
        kept = params[n].detach()[masks[n]]
        assert torch.equal(kept.sort().values, init[n][masks[n]].sort().values)
        moved |= not torch.equal(kept, init[n][masks[n]])
    assert moved


def test_random_sign_keeps_magnitudes_and_scrambles_signs():
    params, init, masks, _ = _run("random_sign")
    same = []
    for n in NAMES:
        kept, start = params[n].detach()[masks[n]], init[n][masks[n]]
        assert torch.equal(kept.abs(), start.abs())
        same.append(torch.sign(kept) == torch.sign(start))
    same = torch.cat(same)
    assert same.any() and not same.all()


def test_flipped_sign_negates():
    params, init, masks, _ = _run("flipped_sign")
    for n in NAMES:
        assert torch.equal(params[n].detach()[masks[n]], -init[n][masks[n]])


def test_reinit_same_sign_keeps_signs_changes_magnitudes():
    params, init, masks, _ = _run("reinit_same_sign")
    for n in NAMES:
        kept, start = params[n].detach()[masks[n]], init[n][masks[n]]
        assert torch.equal(torch.sign(kept), torch.sign(start))
        assert not torch.allclose(kept.abs(), start.abs())


def test_reinit_is_a_masked_fresh_draw():
    params, init, masks, _ = _run("reinit", seed=5)
    ref, *_ = _setup()
    reinitialize_(ref, list(NAMES), torch.Generator().manual_seed(5))
    ref_params = dict(ref.named_parameters())
    for n in NAMES:
        assert torch.equal(params[n].detach(), ref_params[n].detach() * masks[n])
        assert not torch.allclose(params[n].detach()[masks[n]], init[n][masks[n]])


def test_accepts_masks_object():
    model, init, masks = _setup()
    m = Masks(model)
    m.masks.update(masks)
    init_kept_("flipped_sign", model, m, init, torch.Generator().manual_seed(0))
    assert torch.equal(model[0].weight.detach()[masks["0.weight"]], -init["0.weight"][masks["0.weight"]])


def test_unknown_policy_lists_known_ones():
    model, init, masks = _setup()
    with pytest.raises(UnknownNameError) as info:
        init_kept_("rewind", model, masks, init, torch.Generator())
    for name in ("original", "reinit", "reinit_same_sign", "reshuffle", "signed_constant", "random_sign", "flipped_sign"):
        assert name in str(info.value)
    assert len(KEPT_INITS.names()) == 7


def test_bad_names_and_shapes_are_config_errors_and_write_nothing():
    model, init, masks = _setup()
    before = snapshot(model)
    partial = {n: t for n, t in init.items() if n != "2.weight"}
    with pytest.raises(ConfigError, match=r"2\.weight"):
        init_kept_("original", model, masks, partial, torch.Generator())
    bad = {**masks, "2.weight": torch.ones(2, 2, dtype=torch.bool)}
    with pytest.raises(ConfigError, match=r"2\.weight"):
        init_kept_("original", model, bad, init, torch.Generator())
    with pytest.raises(ConfigError, match=r"fc9\.weight"):
        init_kept_("original", model, {**masks, "fc9.weight": torch.ones(1, dtype=torch.bool)}, init, torch.Generator())
    for n, t in snapshot(model).items():
        assert torch.equal(t, before[n])
