"""N:M sparsity: the pattern, its training-time enforcement and the GPU export's CPU error."""
from __future__ import annotations

import pytest
import torch

from secateurs import PruningNotice
from torch import nn

from secateurs.errors import ConfigError, SparsityMismatchError
from secateurs.methods import NMSparsifier
from secateurs.granularity import (
    assert_nm,
    check_nm,
    nm_mask,
    nm_masks,
    to_semi_structured,
)
from secateurs.methods import METHODS


def _mlp(widths=(16, 32, 8)) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _train(model, opt, sparsifier, steps: int) -> None:
    x, y = torch.randn(32, model[0].in_features), torch.randint(0, model[-1].out_features, (32,))
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsifier.step()


# -- the pattern ----------------------------------------------------------------------------
def test_linear_keeps_the_n_largest_of_each_group():
    scores = torch.tensor([[1.0, 4.0, 2.0, 3.0, 8.0, 7.0, 6.0, 5.0],
                           [0.5, -9.0, 0.1, 0.2, 0.0, 0.0, 3.0, 0.0]])
    expected = torch.tensor([[0, 1, 0, 1, 1, 1, 0, 0],
                             [1, 0, 0, 1, 1, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(nm_mask(scores, 2, 4), expected)


def test_conv_groups_run_along_flattened_in_times_kernel():
    # weight [out=2, in=2, kh=1, kw=2]: each output row flattens to (in0k0, in0k1, in1k0, in1k1)
    w = torch.tensor([[[[0.1, 0.9]], [[0.5, 0.2]]],
                      [[[0.3, 0.1]], [[0.2, 0.4]]]])
    mask = nm_mask(w, 2, 4)
    assert mask.shape == w.shape
    kept = {tuple(i) for i in torch.nonzero(mask).tolist()}
    assert kept == {(0, 0, 0, 1), (0, 1, 0, 0), (1, 0, 0, 0), (1, 1, 0, 1)}
    big = torch.randn(8, 4, 3, 3)
    assert check_nm(nm_mask(big.abs(), 2, 4), 2, 4)


def test_ties_go_to_the_lowest_index_deterministically():
    scores = torch.tensor([[3.0, 1.0, 3.0, 3.0, 2.0, 2.0, 2.0, 2.0],
                           [-float("inf")] * 4 + [0.0, -float("inf"), -float("inf"), 0.0]])
    expected = torch.tensor([[1, 0, 1, 0, 1, 1, 0, 0],
                             [1, 1, 0, 0, 1, 0, 0, 1]], dtype=torch.bool)
    for _ in range(3):
        assert torch.equal(nm_mask(scores, 2, 4), expected)


@pytest.mark.parametrize("n, m", [(1, 4), (2, 4), (3, 4), (2, 8), (4, 8)])
def test_general_nm_keeps_the_top_n_and_is_exactly_1_minus_n_over_m_sparse(n, m):
    w = torch.randn(24, 64)
    mask = nm_mask(w.abs(), n, m)
    groups, kept = w.abs().reshape(24, -1, m), mask.reshape(24, -1, m)
    assert bool((kept.sum(-1) == n).all())
    lowest_kept = groups.masked_fill(~kept, float("inf")).amin(-1)
    highest_dropped = groups.masked_fill(kept, -float("inf")).amax(-1)
    assert bool((lowest_kept >= highest_dropped).all())
    assert 1 - mask.sum().item() / mask.numel() == 1 - n / m


def test_nm_masks_uses_magnitude_and_names_incompatible_layers():
    weights = {"fc.weight": torch.tensor([[-5.0, 1.0, 2.0, -3.0]]), "conv.weight": torch.randn(4, 4, 3, 3)}
    masks = nm_masks(weights, 2, 4)
    assert masks["fc.weight"].tolist() == [[True, False, False, True]]
    assert check_nm(masks["conv.weight"], 2, 4)
    with pytest.raises(ConfigError, match=r"head\.weight \(3, 10\)"):
        nm_masks({**weights, "head.weight": torch.randn(3, 10)}, 2, 4)
    with pytest.raises(ConfigError, match=r"stem\.weight.*27 inputs.*exclude"):
        nm_mask(torch.randn(8, 3, 3, 3), 2, 4, name="stem.weight")


@pytest.mark.parametrize("n, m", [(0, 4), (4, 4), (5, 4), (2, 0), (2.0, 4), (True, 4), (1, 1)])
def test_bad_n_m_raise(n, m):
    with pytest.raises(ConfigError, match="n"):
        nm_mask(torch.randn(4, 8), n, m)


def test_check_and_assert_nm_name_the_bad_group():
    good = nm_mask(torch.randn(4, 8), 2, 4)
    assert check_nm(good, 2, 4) and not check_nm(good, 1, 4)
    assert_nm(good, 2, 4, name="fc.weight")
    bad = good.clone()
    bad[2, 4:] = True
    assert not check_nm(bad, 2, 4)
    with pytest.raises(SparsityMismatchError, match=r"fc\.weight.*output 2, inputs 4\.\.7.*keep 4"):
        assert_nm(bad, 2, 4, name="fc.weight")
    assert not check_nm(torch.ones(4, 6, dtype=torch.bool), 2, 4)
    with pytest.raises(SparsityMismatchError, match="fc.weight"):
        assert_nm(torch.ones(4, 6, dtype=torch.bool), 2, 4, name="fc.weight")


# -- training with the pattern --------------------------------------------------------------
def test_sparsifier_keeps_the_pattern_through_sgd_momentum_fine_tuning():
    assert METHODS.get("nm") is NMSparsifier and NMSparsifier.timing == "after"
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sparsifier = NMSparsifier(model, opt, n=2, m=4)
    dense = {k: w.detach().clone() for k, w in sparsifier.masks.weights().items()}
    stats = sparsifier.prune()
    assert stats["sparsity"] == 0.5
    for k, mask in sparsifier.masks.masks.items():
        assert torch.equal(mask, nm_mask(dense[k].abs(), 2, 4))
    assert sparsifier.history[-1]["kind"] == "prune" and sparsifier.history[-1]["sparsity"] == 0.5
    _train(model, opt, sparsifier, steps=10)
    for k, w in sparsifier.masks.weights().items():
        mask = sparsifier.masks[k]
        assert_nm(mask, 2, 4, name=k)
        assert bool((w[~mask] == 0).all())
        momentum = opt.state[w]["momentum_buffer"]
        assert bool((momentum[~mask] == 0).all()) and bool((momentum[mask] != 0).any())
        assert not torch.equal(w[mask], dense[k][mask])  # kept weights did train
    assert sparsifier.sparsity == 0.5


def test_sparsifier_general_nm_exclude_keep_dense_and_errors():
    model = _mlp((10, 16, 8))  # "0.weight" has 10 inputs: not divisible by 4
    with pytest.warns(PruningNotice, match=r"left 1 layer\(s\) dense .* 0\.weight \(16, 10\)"):
        s = NMSparsifier(model, n=2, m=4)  # the misfit stays dense, as NVIDIA's ASP does
    s.prune()
    assert s.left_dense == ["0.weight"] and s.masks["0.weight"].all() and check_nm(s.masks["2.weight"], 2, 4)
    s = NMSparsifier(model, exclude=["0.weight"], n=1, m=4, takeover=True)  # replaces the first on this model
    s.prune()
    assert s.masks.names() == ["2.weight"] and s.sparsity == 0.75
    s = NMSparsifier(model, keep_dense=["0.weight"], n=2, m=8, takeover=True)
    s.prune(0.75)
    layers = s.stats()["layers"]
    assert layers["0.weight"]["sparsity"] == 0.0 and layers["2.weight"]["sparsity"] == 0.75
    with pytest.raises(ConfigError, match="1 - 2/8"):
        s.prune(0.5)
    with pytest.raises(ConfigError, match="1 <= n < m"):
        NMSparsifier(_mlp(), n=4, m=4)
    with pytest.raises(ConfigError, match="not 0.9"):
        NMSparsifier(_mlp(), sparsity=0.9)
    with pytest.raises(ConfigError, match="layer_sparsity"):
        NMSparsifier(_mlp(), layer_sparsity={"0.weight": 0.3})
    with pytest.raises(ConfigError, match="recompute_every"):
        NMSparsifier(_mlp(), recompute_every=-1)
    with pytest.raises(ConfigError, match="nothing to prune"):
        NMSparsifier(_mlp(), keep_dense=["*.weight"])


def test_recompute_every_reselects_masks_and_keeps_the_pattern():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    s = NMSparsifier(model, opt, n=2, m=4, recompute_every=2)
    _train(model, opt, s, steps=2)  # before prune(): nothing to recompute
    assert s.history == []
    s.prune()
    _train(model, opt, s, steps=6)
    recomputes = [h for h in s.history if h["kind"] == "recompute"]
    assert [h["step"] for h in recomputes] == [4, 6, 8]
    assert all(0.0 <= h["flip_rate"] <= 1.0 and h["sparsity"] == 0.5 for h in recomputes)
    for k, w in s.masks.weights().items():
        assert_nm(s.masks[k], 2, 4, name=k)
        assert bool((w[~s.masks[k]] == 0).all())
    resumed = NMSparsifier(_mlp(), n=2, m=4, recompute_every=2)
    resumed.load_state_dict(s.state_dict())
    assert resumed._nm_set and resumed.steps == 8


# -- export ---------------------------------------------------------------------------------
def test_to_semi_structured_on_cpu_explains_it_needs_an_ampere_gpu():
    model = _mlp()
    s = NMSparsifier(model, n=2, m=4)
    s.prune()
    with pytest.raises(ConfigError, match=r"(?s)GPU.*Ampere"):
        to_semi_structured(model, s.masks)
    with pytest.raises(ConfigError, match="Ampere"):
        to_semi_structured(model)


_AMPERE = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


@pytest.mark.skipif(not _AMPERE, reason="needs an NVIDIA GPU with compute capability >= 8.0")
def test_to_semi_structured_matches_the_masked_dense_model_on_gpu():
    model = _mlp((128, 256, 128)).cuda().half()
    s = NMSparsifier(model, n=2, m=4)
    s.prune()
    x = torch.randn(64, 128, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        expected = model(x)
    assert to_semi_structured(model, s.masks) == ["0.weight", "2.weight"]
    with torch.inference_mode():
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)
