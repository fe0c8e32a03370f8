"""Growing layers: the function is preserved at growth, GradMax's SVD directions give the
largest gradient, optimizer state follows the grown parameters, and a grown run resumes."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from secateurs.errors import CheckpointError, ConfigError
from secateurs.grow import (
    ZERO_INCOMING, Grower, add_units, gradmax_directions, growth_gradient, growth_site,
    new_unit_weights, outgoing_gradient, widths,
)
from secateurs.models import MLP, create_model


def _data(shape=(16, 1, 28, 28), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randint(0, 10, (shape[0],), generator=g)


def _trained(model, x, y, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


def _small_lenet():
    """LeNet-5's layout at a tenth of its size: conv-relu-pool-conv-relu-pool-fc-relu-fc."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 12), nn.ReLU(), nn.Linear(12, 10),
    )


SITES = [("0", 6 * 9), ("3", 12 * 4), ("7", 10)]


@pytest.mark.parametrize("layer,fan_out", SITES)
@pytest.mark.parametrize("init", ["gradmax", "gradmax_incoming", "random", "zero"])
def test_growing_leaves_the_output_unchanged(layer, fan_out, init):
    # conv -> pool -> conv, conv -> pool -> flatten -> linear, and linear -> linear
    model = _small_lenet()
    x, y = _data((16, 1, 14, 14))
    _trained(model, x, y)
    site = growth_site(model, layer, x[:4])
    assert site.fan_out == fan_out
    before = model(x).detach()
    incoming, outgoing = new_unit_weights(model, site, 3, init, scale=0.5, bias=1e-3, batches=[(x, y)], example_input=x[:4])
    grown = add_units(model, site, 3, incoming=incoming, outgoing=outgoing, bias=1e-3 if init in ZERO_INCOMING else 0.0,
                      example_input=x[:4])
    assert grown.units == site.units + 3 and model.get_submodule(layer).weight.shape[0] == site.units + 3
    after = model(x).detach()
    assert torch.allclose(after, before, atol=1e-6, rtol=0)
    if init == "gradmax":
        assert outgoing.abs().sum() > 0 and model.get_submodule(layer).weight[-3:].abs().sum() == 0


def test_gradmax_directions_beat_random_directions_of_the_same_norm():
    model = MLP(20, (12, 8), 5)
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    _trained(model, x, y)
    site = growth_site(model, "net.1", x[:4])
    k = 3
    best, s = gradmax_directions(model, site, k, [(x, y)], bias=1e-3, example_input=x[:4])
    assert torch.allclose(best @ best.T, torch.eye(k), atol=1e-5)  # orthonormal
    norm = growth_gradient(model, site, best, [(x, y)], bias=1e-3, example_input=x[:4]).norm()
    # the optimum is the root of the sum of the k largest squared singular values
    assert float(norm) == pytest.approx(float(s[:k].square().sum().sqrt()), rel=1e-4)
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        rand = torch.randn(k, site.fan_out, generator=g)
        rand = rand / rand.norm(dim=1, keepdim=True)  # unit norm per unit, like the GradMax rows
        assert growth_gradient(model, site, rand, [(x, y)], bias=1e-3, example_input=x[:4]).norm() <= norm * (1 + 1e-5)


def test_incoming_gradmax_directions_beat_random_ones_when_the_activation_is_linear():
    # with an identity activation the linearisation is exact: the SVD bound is reached
    model = nn.Sequential(nn.Linear(20, 12), nn.Identity(), nn.Linear(12, 5))
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    site = growth_site(model, "0", x[:4])
    k = 3
    best, s = gradmax_directions(model, site, k, [(x, y)], bias=0.0, example_input=x[:4], side="incoming")
    assert torch.allclose(best @ best.T, torch.eye(k), atol=1e-5)
    norm = outgoing_gradient(model, site, best, [(x, y)], example_input=x[:4]).norm()
    assert float(norm) == pytest.approx(float(s[:k].square().sum().sqrt()), rel=1e-4)
    g = torch.Generator().manual_seed(2)
    for _ in range(30):
        rand = torch.randn(k, site.fan_in, generator=g)
        rand = rand / rand.norm(dim=1, keepdim=True)
        assert outgoing_gradient(model, site, rand, [(x, y)], example_input=x[:4]).norm() <= norm * (1 + 1e-5)


def test_incoming_gradmax_picks_the_sign_a_relu_lets_through():
    model = MLP(20, (12, 8), 5)
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    _trained(model, x, y)
    site = growth_site(model, "net.3", x[:4])  # its inputs are post-ReLU, so w.h and -w.h differ
    best, _ = gradmax_directions(model, site, 4, [(x, y)], bias=0.0, example_input=x[:4], side="incoming")
    chosen = outgoing_gradient(model, site, best, [(x, y)], example_input=x[:4]).norm(dim=1)
    flipped = outgoing_gradient(model, site, -best, [(x, y)], example_input=x[:4]).norm(dim=1)
    assert (chosen >= flipped).all() and (chosen > flipped).any()


def test_zero_incoming_units_need_a_positive_bias_to_learn_through_a_relu():
    model = MLP(20, (12,), 5)
    x, y = torch.randn(32, 20), torch.randint(0, 5, (32,))
    site = growth_site(model, "net.1", x[:4])
    out = torch.randn(2, site.fan_out)
    assert growth_gradient(model, site, out, [(x, y)], bias=1e-3, example_input=x[:4]).abs().sum() > 0
    assert growth_gradient(model, site, out, [(x, y)], bias=0.0, example_input=x[:4]).abs().sum() == 0


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_optimizer_state_is_padded_and_follows_the_new_parameters(kind):
    model = MLP(10, (6,), 3)
    x, y = torch.randn(16, 10), torch.randint(0, 3, (16,))
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if kind == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-2))
    _step = lambda: (opt.zero_grad(), F.cross_entropy(model(x), y).backward(), opt.step())  # noqa: E731
    _step()
    w1, w2 = model.net[1].weight, model.net[3].weight
    key = "momentum_buffer" if kind == "sgd" else "exp_avg"
    old1, old2 = opt.state[w1][key].clone(), opt.state[w2][key].clone()
    site = growth_site(model, "net.1", x[:4])
    incoming, _ = new_unit_weights(model, site, 4, "random", scale=0.5, bias=0.0)
    add_units(model, site, 4, incoming=incoming, optimizer=opt, example_input=x[:4])
    n1, n2 = model.net[1].weight, model.net[3].weight
    params = [p for g in opt.param_groups for p in g["params"]]
    assert any(p is n1 for p in params) and not any(p is w1 for p in params)
    assert w1 not in opt.state and n1 in opt.state
    assert torch.equal(opt.state[n1][key][:6], old1) and torch.equal(opt.state[n1][key][6:], torch.zeros(4, 10))
    assert torch.equal(opt.state[n2][key][:, :6], old2) and torch.equal(opt.state[n2][key][:, 6:], torch.zeros(3, 4))
    if kind == "adam":
        assert opt.state[n1]["step"] == 1
    _step()  # the optimizer runs on the grown shapes
    assert model.net[1].weight.shape == (10, 10) and torch.isfinite(model.net[1].weight).all()


def test_unsupported_growth_is_refused_with_a_reason():
    x = torch.randn(4, 3, 8, 8)
    padded = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), nn.Flatten(), nn.Linear(5 * 36, 2))
    site = growth_site(padded, "0", x)
    with pytest.raises(ConfigError, match="zero-pads"):
        add_units(padded, site, 1, outgoing=torch.ones(1, site.fan_out), bias=1e-3, example_input=x)
    add_units(padded, site, 1, incoming=torch.randn(1, site.fan_in), example_input=x)  # random growth is fine
    bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.Flatten(), nn.Linear(5 * 16, 2))
    site = growth_site(bn, "0", x)
    with pytest.raises(ConfigError, match="BatchNorm"):
        add_units(bn, site, 1, outgoing=torch.ones(1, site.fan_out), bias=1e-3, example_input=x)
    grown = add_units(bn, site, 2, incoming=torch.randn(2, site.fan_in), example_input=x)
    assert bn[1].num_features == 6 and bn[1].running_mean.shape == (6,) and grown.units == 6
    mlp = MLP(10, (6,), 3)
    site = growth_site(mlp, "net.1", torch.randn(2, 10))
    with pytest.raises(ConfigError, match="both incoming and outgoing"):
        add_units(mlp, site, 1, incoming=torch.ones(1, 10), outgoing=torch.ones(1, 3), example_input=torch.randn(2, 10))
    with pytest.raises(ConfigError, match="output's channels are fixed"):
        growth_site(mlp, "net.3", torch.randn(2, 10))
    with pytest.raises(ConfigError, match="residual sum"):
        growth_site(create_model("resnet20", in_channels=3, image_size=32), "layer1.0.conv2", torch.randn(2, 3, 32, 32))
    with pytest.raises(ConfigError, match="unknown growth init"):
        Grower(mlp, None, {"net.1": 8}, example_input=torch.randn(2, 10), init="xavier")
    with pytest.raises(ConfigError, match="below its current width"):
        Grower(mlp, None, {"net.1": 4}, example_input=torch.randn(2, 10), init="random")


def _grower(model, opt, x, y, init="gradmax"):
    return Grower(model, opt, {"net.1": 16, "net.3": 9}, example_input=x[:4], init=init, start=2, every=3,
                  events=3, batches=lambda: [(x, y)], seed=0, measure=True)


def test_grower_reaches_the_targets_on_schedule_and_resumes_exactly():
    x, y = torch.randn(32, 12), torch.randint(0, 4, (32,))
    torch.manual_seed(0)
    model = MLP(12, (4, 3), 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    grower = _grower(model, opt, x, y)
    assert grower.planned(1) == {"net.1": 8, "net.3": 5} and grower.planned(3) == {"net.1": 16, "net.3": 9}
    seen = []

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        grower.step()
        seen.append(tuple(widths(model, ["net.1", "net.3"]).values()))

    for _ in range(5):
        step()
    assert seen == [(4, 3), (8, 5), (8, 5), (8, 5), (12, 7)]
    state = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "grower": grower.state_dict()})
    for _ in range(5):
        step()
    assert seen[-1] == (16, 9) and grower.finished
    assert [h["step"] for h in grower.history] == [2, 2, 5, 5, 8, 8] and all(h["grad_norm"] > 0 for h in grower.history)
    expected = model(x).detach()

    torch.manual_seed(0)
    fresh = MLP(12, (4, 3), 4)
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    resumed = _grower(fresh, opt2, x, y)
    with pytest.raises(CheckpointError, match="restore_widths"):
        resumed.load_state_dict(state["grower"])
    resumed.restore_widths(state["grower"])
    fresh.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    resumed.load_state_dict(state["grower"])
    model, opt, grower = fresh, opt2, resumed
    for _ in range(5):
        step()
    assert torch.allclose(fresh(x), expected, atol=1e-6)
    other = Grower(MLP(12, (4, 3), 4), None, {"net.1": 20}, example_input=x[:4], init="random")
    with pytest.raises(CheckpointError, match="same model and targets"):
        other.restore_widths(state["grower"])
