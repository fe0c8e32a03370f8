"""Pruning during training: the swap engine, regrowth rules and the GMP / SET / RigL /
GraNet / CTRE recipes, asserted on their defining behaviour."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateurs.allocation import keep_count
from secateurs.engine import drop_and_grow
from secateurs.errors import ConfigError, UnknownNameError
from secateurs.methods import CTRE, GMP, METHODS, SET, GraNet, RigL
from secateurs.regrowth import build_regrowth, regrow_by_cosine
from secateurs.schedules import CosineDropFraction, cosine_drop_fraction, cubic_sparsity, parse_duration


# -- engine ----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_drop_and_grow_conserves_counts_and_picks_extremes(seed):
    g = torch.Generator().manual_seed(seed)
    masks = {"a": torch.rand(40, 30, generator=g) > 0.7, "b": torch.rand(200, generator=g) > 0.4}
    drop = {n: torch.randn(m.shape, generator=g) for n, m in masks.items()}
    grow = {n: torch.randn(m.shape, generator=g) for n, m in masks.items()}
    n = {"a": 50, "b": 20}
    new, grown = drop_and_grow(masks, drop, grow, n)
    for name, old in masks.items():
        assert int(new[name].sum()) == int(old.sum())  # count conserved
        assert int(grown[name].sum()) == n[name]
        assert not (grown[name] & old).any(), "grew an already-active connection"
        dropped = old & ~new[name]
        assert int(dropped.sum()) == n[name]
        kept = old & new[name]
        assert drop[name][dropped].max() <= drop[name][kept].min()  # the lowest active dropped
        candidates = ~old & ~grown[name]
        assert grow[name][grown[name]].min() >= grow[name][candidates].max()  # the highest inactive grown


def test_drop_and_grow_never_grows_active_even_with_infinite_scores():
    mask = torch.tensor([True, True, False, False])
    grow = torch.tensor([math.inf, math.inf, -math.inf, -math.inf])
    new, grown = drop_and_grow({"w": mask}, {"w": torch.tensor([1.0, 2.0, 0.0, 0.0])}, {"w": grow}, {"w": 1})
    assert grown["w"].tolist() == [False, False, True, False]
    assert new["w"].tolist() == [False, True, True, False]


def test_drop_and_grow_rejects_impossible_counts():
    mask = torch.tensor([True, True, True, False])
    with pytest.raises(ConfigError, match="cannot swap 2"):
        drop_and_grow({"w": mask}, {"w": torch.zeros(4)}, {"w": torch.zeros(4)}, {"w": 2})


# -- schedules ---------------------------------------------------------------------------------
def test_cosine_drop_fraction_shape():
    assert cosine_drop_fraction(0, 0.3, 0, 100) == pytest.approx(0.3)
    assert cosine_drop_fraction(50, 0.3, 0, 100) == pytest.approx(0.15)
    assert cosine_drop_fraction(100, 0.3, 0, 100) == 0.0
    assert cosine_drop_fraction(100, 0.5, 0, 100, minimum=0.005) == pytest.approx(0.005)
    s = CosineDropFraction(initial=0.3, every=10, end=35)
    assert [t for t in range(40) if s.updates_at(t)] == [10, 20, 30]


@pytest.mark.parametrize("kwargs,match", [
    (dict(initial=0.0, every=10, end=100), "drop fraction"),
    (dict(initial=1.5, every=10, end=100), "drop fraction"),
    (dict(initial=0.3, every=100, end=100), "not shorter than the update window"),
    (dict(initial=0.3, every=10, end=5, start=5), "start < end"),
    (dict(initial=0.3, every=10, end=100, minimum=0.5), "exceeds"),
])
def test_cosine_drop_fraction_rejects_bad_input(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CosineDropFraction(**kwargs)


def test_parse_duration():
    assert parse_duration(1000, what="x") == 1000
    assert parse_duration("1000it", what="x") == 1000
    assert parse_duration("2ep", what="x", steps_per_epoch=391) == 782
    assert parse_duration("75%", what="x", total_steps=1000) == 750
    with pytest.raises(ConfigError, match="steps_per_epoch"):
        parse_duration("2ep", what="every")
    with pytest.raises(ConfigError, match="cannot read"):
        parse_duration("ten", what="every")


# -- recipes ---------------------------------------------------------------------------------
def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))


def _data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    return x, (x[:, :5].argmax(1))


def _train(model, sparsifier, opt, steps, before_step=None, after_step=None, batch=32):
    x, y = _data()
    for s in range(steps):
        i = (s * batch) % len(x)
        loss = F.cross_entropy(model(x[i:i + batch]), y[i:i + batch])
        opt.zero_grad()
        loss.backward()
        if before_step:
            before_step(s + 1)
        opt.step()
        sparsifier.step()
        if after_step:
            after_step(s + 1)


def test_rigl_regrows_largest_dense_gradients_at_zero_with_zero_momentum():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = RigL(model, opt, sparsity=0.8, total_steps=40, every=10)
    names = sp.masks.names()
    snap = {}

    def before(t):
        if sp.swap_schedule.updates_at(t):
            snap["grad"] = {n: p.grad.abs().clone() for n, p in sp.masks.weights().items()}
            snap["old"] = {n: m.clone() for n, m in sp.masks.masks.items()}

    checked = []

    def after(t):
        assert sp.sparsity == pytest.approx(sp.history[0]["sparsity"])  # constant sparsity, every step
        if "old" not in snap:
            return
        for n in names:
            old, new = snap["old"][n], sp.masks[n]
            grown = new & ~old
            assert int(new.sum()) == int(old.sum())
            k = int(grown.sum())
            if k == 0:
                continue
            cand = snap["grad"][n][~old]
            assert snap["grad"][n][grown].min() >= cand.kthvalue(cand.numel() - k + 1).values - 1e-12
            w = sp.masks.params[n]
            assert (w[grown] == 0).all(), "regrown weights must start at zero"
            assert (opt.state[w]["momentum_buffer"][grown] == 0).all(), "regrown momentum must be zero"
        checked.append(t)
        snap.clear()

    _train(model, sp, opt, 40, before, after)
    assert checked == [10, 20]  # updates stop at 75% of training (step 30 is the end, exclusive)
    assert [h["kind"] for h in sp.history] == ["init", "swap", "swap"]
    assert all(h["dense_gradient"] for h in sp.history if h["kind"] == "swap")


def test_set_regrows_randomly_but_reproducibly():
    def run():
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sp = SET(model, opt, sparsity=0.7, total_steps=30, every=10, seed=3)
        _train(model, sp, opt, 30)
        return sp

    a, b = run(), run()
    for n in a.masks:
        assert torch.equal(a.masks[n], b.masks[n])
    assert a.sparsity == pytest.approx(a.history[0]["sparsity"])
    assert sum(h["swapped"] for h in a.history if h["kind"] == "swap") > 0


def test_initial_masks_are_erk_shaped():
    model = _mlp()
    sp = SET(model, None, sparsity=0.8, total_steps=1000)
    dens = sp.history[0]["density"]
    # ERK: the small output layer (32 -> 5) is denser than the square hidden layer
    assert dens["5.weight"] > dens["3.weight"]
    total = sum(sp.masks.numel().values())
    assert sum(sp.masks.active().values()) == keep_count(total, 0.8)


@pytest.mark.parametrize("initial", [0.0, 0.5])
def test_granet_follows_the_cubic_schedule_exactly(initial):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    T = 60
    sp = GraNet(model, opt, sparsity=0.9, initial_sparsity=initial, total_steps=T, every=10, end="50%")
    total = sum(sp.masks.numel().values())
    seen = []

    def after(t):
        active = sum(sp.masks.active().values())
        target = cubic_sparsity(t, initial, 0.9, 0, 30) if t <= 30 else 0.9
        expected = keep_count(total, target) if t % 10 == 0 and t <= 30 else None
        if expected is not None:
            assert active == expected, f"step {t}: {active} active, schedule says {expected}"
        seen.append(active)

    _train(model, sp, opt, T, after_step=after)
    assert sum(sp.masks.active().values()) == keep_count(total, 0.9)
    kinds = [h["kind"] for h in sp.history]
    assert kinds.count("prune") == 3 and kinds.count("swap") == 5  # swaps continue after pruning ends
    assert seen == sorted(seen, reverse=True)  # never denser: regeneration conserves counts
    fractions = [h["fraction"] for h in sp.history if h["kind"] == "swap"]
    assert fractions == sorted(fractions, reverse=True) and fractions[0] < 0.5
    if initial:
        assert sp.history[0]["kind"] == "init" and sp.history[0]["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_gmp_is_monotone_and_reaches_target():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = GMP(model, opt, sparsity=0.75, total_steps=50, every=5, end=25, scope="uniform")
    prev = {n: m.clone() for n, m in sp.masks.masks.items()}

    def after(t):
        for n, m in sp.masks.masks.items():
            assert not (m & ~prev[n]).any(), "GMP revived a weight"
            prev[n] = m.clone()

    _train(model, sp, opt, 50, after_step=after)
    for name, s in sp.masks.layer_sparsity().items():
        assert s == pytest.approx(0.75, abs=1 / sp.masks.numel()[name])
    assert len(sp.history) == 5


def test_cosine_scores_on_hand_made_activations():
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    model = nn.Sequential(layer)
    x = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0], [2.0, 3.0, 0.0]])
    s = regrow_by_cosine(model, {"0.weight": layer.weight}, x)["0.weight"]
    # output unit 0 equals input unit 0, output unit 1 equals input unit 2
    assert s[0, 0] == pytest.approx(1.0) and s[1, 2] == pytest.approx(1.0)
    xi = x / x.norm(dim=0)
    assert s[0, 1] == pytest.approx(float((xi[:, 0] * xi[:, 1]).sum().abs()))


def test_cosine_scores_for_grouped_conv_share_kernel_positions():
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=2)
    s = regrow_by_cosine(nn.Sequential(conv), {"0.weight": conv.weight}, torch.randn(8, 4, 5, 5))["0.weight"]
    assert s.shape == conv.weight.shape
    assert torch.equal(s[:, :, 0, 0], s[:, :, 2, 1])
    assert (s >= 0).all() and (s <= 1 + 1e-6).all()


def test_ctre_grows_most_similar_pairs_and_resumes_exactly():
    x, y = _data()
    batches = lambda: [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]

    def build(model, opt):
        return CTRE(model, opt, sparsity=0.8, total_steps=40, steps_per_epoch=8, explore=0.0, batches=batches)

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = build(model, opt)
    _train(model, sp, opt, 40)
    assert sp.sparsity == pytest.approx(sp.history[0]["sparsity"])
    assert [h["step"] for h in sp.history if h["kind"] == "swap"] == [8, 16, 24, 32]
    # interrupted after 20 steps and resumed: the same masks at the end
    model2 = _mlp()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05)
    sp2 = build(model2, opt2)
    _train(model2, sp2, opt2, 20)
    saved = (sp2.state_dict(), model2.state_dict(), opt2.state_dict())
    model3 = _mlp(seed=9)
    opt3 = torch.optim.SGD(model3.parameters(), lr=0.05)
    sp3 = build(model3, opt3)
    model3.load_state_dict(saved[1]); opt3.load_state_dict(saved[2]); sp3.load_state_dict(saved[0])
    x_all, y_all = _data()
    for s in range(20, 40):  # continue the same data stream
        i = (s * 32) % len(x_all)
        loss = F.cross_entropy(model3(x_all[i:i + 32]), y_all[i:i + 32])
        opt3.zero_grad(); loss.backward(); opt3.step(); sp3.step()
    for n in sp.masks:
        assert torch.equal(sp.masks[n], sp3.masks[n])
    assert sp3._batches_used == sp._batches_used


def test_mask_grads_is_skipped_right_before_a_gradient_swap():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = RigL(model, opt, sparsity=0.8, total_steps=40, every=10)
    x, y = _data()
    F.cross_entropy(model(x[:32]), y[:32]).backward()
    sp.steps = 9  # the next step swaps
    sp.mask_grads_()
    w = sp.masks.params["1.weight"]
    assert (w.grad[~sp.masks["1.weight"]] != 0).any()
    sp.steps = 3
    sp.mask_grads_()
    assert (w.grad[~sp.masks["1.weight"]] == 0).all()


# -- bad input -------------------------------------------------------------------------------
def test_bad_input_messages():
    model = _mlp()
    with pytest.raises(ConfigError, match="start < end"):
        GMP(model, sparsity=0.9, total_steps=100, start=60, end=50)
    with pytest.raises(ConfigError, match="longer than the pruning window"):
        GMP(model, sparsity=0.9, total_steps=100, every=80, end=50)
    with pytest.raises(ConfigError, match="drop fraction"):
        RigL(model, sparsity=0.9, total_steps=100, drop_fraction=1.5)
    with pytest.raises(ConfigError, match="drop fraction"):
        SET(model, sparsity=0.9, total_steps=100, drop_fraction=0.0)
    with pytest.raises(ConfigError, match="not shorter"):
        RigL(model, sparsity=0.9, total_steps=100, every=500)
    with pytest.raises(ConfigError, match="below the final"):
        GraNet(model, sparsity=0.5, initial_sparsity=0.6, total_steps=100)
    with pytest.raises(ConfigError, match="total_steps"):
        RigL(model, sparsity=0.9, total_steps=0)
    with pytest.raises(UnknownNameError, match="gradient"):
        build_regrowth("momentum")
    with pytest.raises(ConfigError, match="needs data"):
        sp = CTRE(model, None, sparsity=0.9, total_steps=100, steps_per_epoch=10)
        for _ in range(10):
            sp.step()


def test_erk_that_cannot_meet_the_target_is_an_error():
    model = _mlp()
    with pytest.raises(ConfigError, match="erk allocation cannot reach sparsity 0.5"):
        RigL(model, sparsity=0.5, total_steps=1000, keep_dense=["1.weight", "3.weight"])


def test_all_during_methods_are_registered_with_their_timing():
    for name in ("gmp", "set", "rigl", "granet", "ctre"):
        assert METHODS.get(name).timing == "during"
    assert METHODS.get("magnitude").timing == "after"
