"""Learned supermasks (Zhou et al. 2019; Ramanujan et al. 2020) over frozen random weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateurs.allocation import keep_count
from secateurs.errors import CheckpointError, ConfigError, SparsityMismatchError, UnknownNameError
from secateurs.methods.supermask import Supermask


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is faster than contending for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp(seed: int = 0, d: int = 6, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, classes))


def data(n: int = 32, d: int = 6, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def separable(n: int = 64, d: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes split by a hyperplane: a mask over a random net can fit it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def train(net: Supermask, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 0.5) -> list[float]:
    opt = torch.optim.SGD(net.scores.parameters(), lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("mode", ["topk", "bernoulli"])
def test_wrapped_weights_stay_bit_equal_and_only_scores_learn(mode):
    model = mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    net = Supermask(model, 0.5, mode=mode)
    x, y = data()
    F.cross_entropy(net(x), y).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.scores.parameters())
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {f"scores.{k}" for k in net.scores}
    train(net, x, y, steps=3, lr=10.0)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.99])
def test_topk_keeps_exactly_keep_count_per_layer(sparsity):
    model = mlp()
    net = Supermask(model, sparsity)
    train(net, *data(), steps=2, lr=5.0)  # moved scores must still give the exact counts
    masks = net.masks()
    for name, p in model.named_parameters():
        if name.endswith("weight"):
            assert int(masks[name].sum()) == keep_count(p.numel(), sparsity), name
    total = sum(m.numel() for m in masks.values())
    assert net.sparsity() == pytest.approx(1 - sum(int(m.sum()) for m in masks.values()) / total)


def test_topk_forward_uses_exactly_the_planned_masks():
    net = Supermask(mlp(), 0.7)
    masks = net.masks()
    for name, w in net.effective_weights().items():
        assert torch.equal(w != 0, masks[name] & (dict(net.model.named_parameters())[name] != 0))


def test_masks_count_mismatch_raises(monkeypatch):
    net = Supermask(mlp(), 0.5)
    monkeypatch.setattr(net, "_keep", {n: k + 1 for n, k in net.keep_counts().items()})
    monkeypatch.setattr("secateurs.methods.supermask.topk_mask", lambda s, k: torch.ones_like(s, dtype=torch.bool))
    with pytest.raises(SparsityMismatchError, match="planned"):
        net.masks()


@pytest.mark.parametrize("mode,signed", [("topk", False), ("topk", True), ("bernoulli", False)])
def test_export_matches_eval_forward_and_is_plain_torch(mode, signed):
    net = Supermask(mlp(), 0.6, mode=mode, signed_constant=signed)
    train(net, *data(), steps=3, lr=20.0)
    net.eval()
    exported = net.export()
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(exported(x), net(x), atol=1e-6)
    assert all(not type(m).__module__.startswith("secateurs") for m in exported.modules())
    assert all(p.requires_grad for p in exported.parameters())  # flags from before wrapping
    assert exported is not net.model


def test_signed_constant_uses_sign_times_layer_std():
    net = Supermask(mlp(), 0.5, signed_constant=True)
    w = net.model[0].weight
    eff = net.export()[0].weight
    kept = net.masks()["0.weight"]
    assert torch.allclose(eff[kept].abs(), torch.full_like(eff[kept], float(w.std())))
    assert torch.equal(torch.sign(eff[kept]), torch.sign(w[kept]))


def test_bernoulli_eval_masks_are_deterministic_threshold():
    net = Supermask(mlp(), 0.5, mode="bernoulli")
    train(net, *data(), steps=3, lr=50.0)
    net.eval()
    x = data()[0]
    with torch.no_grad():
        assert torch.equal(net(x), net(x))
    for name, m in net.masks().items():
        assert torch.equal(m, torch.sigmoid(net.scores[name.replace(".", "/")]) > 0.5)


def test_bernoulli_samples_differ_between_training_steps():
    net = Supermask(mlp(), 0.5, mode="bernoulli")
    a, b = net.effective_weights()["0.weight"], net.effective_weights()["0.weight"]
    assert not torch.equal(a != 0, b != 0)


def test_bernoulli_initial_keep_probability_follows_target():
    """``sparsity`` only initialises bernoulli: sampled masks start near it, while the eval
    threshold starts all-kept below 0.5 (the learned sparsity moves from there)."""
    for target in (0.2, 0.8):
        net = Supermask(mlp(), target, mode="bernoulli")
        sampled = net.effective_weights()
        kept = sum(int((w != 0).sum()) for w in sampled.values())
        assert 1 - kept / sum(w.numel() for w in sampled.values()) == pytest.approx(target, abs=0.08)
        assert net.sparsity() == (0.0 if target < 0.5 else 1.0)


@pytest.mark.parametrize("mode", ["topk", "bernoulli"])
def test_same_seed_same_masks_and_trajectory(mode):
    runs = []
    for _ in range(2):
        net = Supermask(mlp(seed=4), 0.5, mode=mode, seed=11)
        initial = net.masks()
        losses = train(net, *data(), steps=3, lr=10.0)
        runs.append((initial, losses, {k: v.detach().clone() for k, v in net.scores.items()}))
    (m1, l1, s1), (m2, l2, s2) = runs
    assert all(torch.equal(m1[n], m2[n]) for n in m1)
    assert l1 == l2
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    other = Supermask(mlp(seed=4), 0.5, mode=mode, seed=12)
    assert not all(torch.equal(m1[n], m) for n, m in other.masks().items())


def test_state_dict_restores_bernoulli_sample_stream():
    net = Supermask(mlp(), 0.5, mode="bernoulli")
    train(net, *data(), steps=2, lr=10.0)
    state = net.state_dict()
    expected = net.effective_weights()["0.weight"]
    twin = Supermask(mlp(seed=9), 0.5, mode="bernoulli", seed=3)
    twin.load_state_dict(state)
    assert torch.equal(twin.effective_weights()["0.weight"], expected)
    with pytest.raises(CheckpointError, match="mode"):
        Supermask(mlp(), 0.5, mode="topk").load_state_dict(state)


@pytest.mark.parametrize("mode,lr", [("topk", 2.0), ("bernoulli", 200.0)])
def test_learning_a_mask_lowers_the_loss(mode, lr):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 2))
    net = Supermask(model, 0.5, mode=mode, seed=0)
    x, y = separable()
    losses = train(net, x, y, steps=50, lr=lr)
    net.eval()
    with torch.no_grad():
        out = net(x)
    assert F.cross_entropy(out, y).item() < 0.8 * losses[0]
    assert (out.argmax(1) == y).float().mean() >= 0.85


def test_include_exclude_choose_layers():
    net = Supermask(mlp(), 0.5, exclude=["4.weight"])
    assert set(net.masks()) == {"0.weight", "2.weight"}
    assert set(net.scores) == {"0/weight", "2/weight"}


def test_conv_layers_are_masked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    net = Supermask(model, 0.5)
    out = net(torch.randn(2, 1, 6, 6))
    assert out.shape == (2, 3)
    assert int(net.masks()["0.weight"].sum()) == keep_count(36, 0.5)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, float("nan"), "0.5"])
def test_bad_sparsity_raises(sparsity):
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        Supermask(mlp(), sparsity)


def test_unknown_mode_lists_modes():
    with pytest.raises(UnknownNameError, match="topk, bernoulli"):
        Supermask(mlp(), 0.5, mode="edgepopup")


def test_model_without_prunable_layers_raises():
    with pytest.raises(ConfigError, match="no prunable parameters"):
        Supermask(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), 0.5)


def test_bad_seed_raises():
    with pytest.raises(ConfigError, match="seed"):
        Supermask(mlp(), 0.5, seed=1.5)
