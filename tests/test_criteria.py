"""Mask criteria of Zhou et al. (2019) on hand-made (w_init, w_final) pairs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs.criteria import CRITERIA, criterion_scores, make_score
from secateurs.engine import prune
from secateurs.errors import ConfigError, UnknownNameError
from secateurs.methods import Sparsifier
from secateurs.selection import topk_mask

# index:               0     1     2     3     4    5
W_I = torch.tensor([0.5, -1.0, 0.2, -0.3, 2.0, 0.0])
W_F = torch.tensor([1.5, 0.4, -0.1, -0.9, 1.0, 0.7])
# signs: 0 same(+,+), 1 flipped, 2 flipped, 3 same(-,-), 4 same(+,+), 5 init zero (neither)

EXPECTED = {
    "large_final": [1.5, 0.4, 0.1, 0.9, 1.0, 0.7],
    "small_final": [-1.5, -0.4, -0.1, -0.9, -1.0, -0.7],
    "large_init": [0.5, 1.0, 0.2, 0.3, 2.0, 0.0],
    "small_init": [-0.5, -1.0, -0.2, -0.3, -2.0, -0.0],
    "large_init_large_final": [0.5, 0.4, 0.1, 0.3, 1.0, 0.0],
    "small_init_small_final": [-1.5, -1.0, -0.2, -0.9, -2.0, -0.7],
    "magnitude_increase": [1.0, -0.6, -0.1, 0.6, -1.0, 0.7],
    "movement": [1.0, 1.4, 0.3, 0.6, 1.0, 0.7],
    # same sign keeps |w_f|; the others get |w_f| - (max|w_f| + 1) = |w_f| - 2.5
    "large_final_same_sign": [1.5, -2.1, -2.4, 0.9, 1.0, -1.8],
    "large_final_diff_sign": [-1.0, 0.4, 0.1, -1.6, -1.5, -1.8],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_criterion_values(name):
    got = CRITERIA.get(name)(W_I, W_F, None)
    assert got.shape == W_F.shape and got.dtype.is_floating_point
    torch.testing.assert_close(got, torch.tensor(EXPECTED[name]))


@pytest.mark.parametrize(
    "name,k,kept",
    [
        ("large_final", 2, [0, 4]),
        ("large_init", 2, [1, 4]),
        ("small_init", 2, [2, 5]),
        ("large_init_large_final", 2, [0, 4]),
        ("small_init_small_final", 2, [2, 5]),
        ("magnitude_increase", 2, [0, 5]),
        ("movement", 1, [1]),
        ("large_final_same_sign", 2, [0, 4]),
        ("large_final_same_sign", 3, [0, 3, 4]),
        ("large_final_same_sign", 4, [0, 3, 4, 5]),
        ("large_final_diff_sign", 2, [1, 2]),
        ("large_final_diff_sign", 3, [0, 1, 2]),
    ],
)
def test_criterion_ranking_keeps_expected_positions(name, k, kept):
    mask = topk_mask(CRITERIA.get(name)(W_I, W_F, None), k)
    assert torch.nonzero(mask).squeeze(1).tolist() == kept


def test_same_sign_keeps_only_same_sign_when_enough():
    g = torch.Generator().manual_seed(3)
    wi, wf = torch.randn(40, generator=g), torch.randn(40, generator=g)
    same = torch.sign(wi) == torch.sign(wf)
    n_same = int(same.sum())
    assert 5 < n_same < 35
    scores = CRITERIA.get("large_final_same_sign")(wi, wf, None)
    assert torch.isfinite(scores).all()
    for k in (1, n_same // 2, n_same):
        mask = prune({"w": torch.ones(40, dtype=torch.bool)}, {"w": scores}, {"w": k})["w"]
        assert not (mask & ~same).any()
        # among same-sign weights, the largest |w_f| are the kept ones
        rest = wf[same & ~mask].abs()
        if rest.numel():
            assert wf[mask].abs().min() >= rest.max()
    # more than n_same: all same-sign kept, then diff-sign by |w_f|
    mask = topk_mask(scores, n_same + 2)
    assert mask[same].all()
    assert wf[mask & ~same].abs().min() >= wf[~mask].abs().max()


def test_random_criterion_uses_only_the_generator():
    before = torch.get_rng_state()
    a = CRITERIA.get("random")(W_I, W_F, torch.Generator().manual_seed(1))
    b = CRITERIA.get("random")(W_I, W_F, torch.Generator().manual_seed(1))
    c = CRITERIA.get("random")(W_I, W_F, torch.Generator().manual_seed(2))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == W_F.shape and ((a >= 0) & (a < 1)).all()
    assert torch.equal(a, torch.rand(6, generator=torch.Generator().manual_seed(1)))


def test_random_without_generator_is_config_error():
    with pytest.raises(ConfigError, match="Generator"):
        criterion_scores("random", {"w": W_I}, {"w": W_F}, None)


def test_criterion_scores_per_layer_and_errors():
    out = criterion_scores("movement", {"a": W_I, "b": W_I[:2]}, {"a": W_F, "b": W_F[:2]})
    assert list(out) == ["a", "b"]
    torch.testing.assert_close(out["b"], torch.tensor([1.0, 1.4]))
    with pytest.raises(ConfigError, match=r"fc2\.weight.*same model"):
        criterion_scores("movement", {"fc1.weight": W_I}, {"fc1.weight": W_F, "fc2.weight": W_F})
    with pytest.raises(ConfigError, match=r"fc1\.weight.*same model"):
        criterion_scores("movement", {"fc1.weight": W_I[:3]}, {"fc1.weight": W_F})


def test_unknown_criterion_lists_known_ones():
    for call in (
        lambda: CRITERIA.get("largest"),
        lambda: criterion_scores("largest", {}, {}),
        lambda: make_score("largest", {}),
    ):
        with pytest.raises(UnknownNameError) as info:
            call()
        for name in CRITERIA.names():
            assert name in str(info.value)
    assert len(CRITERIA.names()) == 11


def test_make_score_drives_a_sparsifier():
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1, -0.5], [0.3, 0.2]]))
    init = {"weight": lin.weight.detach().clone()}
    score = make_score("magnitude_increase", init)
    init["weight"].zero_()  # the score keeps its own copy
    with torch.no_grad():  # "training"
        lin.weight.copy_(torch.tensor([[0.4, -0.6], [-0.1, 0.9]]))
    # |w_f| - |w_i| = [[0.3, 0.1], [-0.2, 0.7]]: keeping 50% keeps positions 0 and 3
    # (large_final would keep 1 and 3 instead)
    sp = Sparsifier(lin, score=score, sparsity=0.5, scope="uniform")
    sp.prune()
    assert sp.masks["weight"].tolist() == [[True, False], [False, True]]
    torch.testing.assert_close(lin.weight.detach(), torch.tensor([[0.4, 0.0], [0.0, 0.9]]))
