"""Gibbs pruning (Labach & Valaee 2020): the sampler against hand-computed Gibbs
probabilities, the low-temperature limit, exact final sparsity, bad input."""
import itertools
import math

import pytest
import torch
from torch import nn

from secateurs import ConfigError
from secateurs.methods import METHODS, GibbsPruning
from secateurs.methods.gibbs import sample_filter
from secateurs.schedules import GeometricCooling, geometric_temperature


def _two_weights(a=0.3, b=-0.1):
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[a, b]]))
    return model


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_unstructured_marginals_match_hand_computed_gibbs_probabilities():
    # H(m) = (q - e1) m1 + (q - e2) m2 with e = w^2 / mean(w^2) and q midway between the
    # two energies (keep 1 of 2): P(m_i = 1) = exp(-(q - e_i)/T) / (1 + exp(-(q - e_i)/T)).
    a, b, temperature = 0.3, -0.1, 0.5
    mean = (a * a + b * b) / 2
    e1, e2 = a * a / mean, b * b / mean  # 1.8, 0.2
    q = (e1 + e2) / 2  # 1.0
    want1 = math.exp(-(q - e1) / temperature) / (1 + math.exp(-(q - e1) / temperature))
    want2 = math.exp(-(q - e2) / temperature) / (1 + math.exp(-(q - e2) / temperature))
    assert want1 == pytest.approx(0.8320, abs=1e-4) and want2 == pytest.approx(0.1680, abs=1e-4)
    model = _two_weights(a, b)
    sp = GibbsPruning(model, sparsity=0.5, total_steps=10, seed=0)
    draws = torch.stack([torch.cat([m.reshape(-1) for m in sp.sample(temperature).values()]) for _ in range(40000)])
    freq = draws.float().mean(0)
    # binomial std at p=0.83, n=40000 is 0.0019: 0.006 is three sigma
    assert freq[0].item() == pytest.approx(want1, abs=0.006)
    assert freq[1].item() == pytest.approx(want2, abs=0.006)
    # the two weights are independent under this Hamiltonian
    both = (draws[:, 0] & draws[:, 1]).float().mean().item()
    assert both == pytest.approx(want1 * want2, abs=0.006)
    # sample() changes nothing
    assert torch.equal(model.weight, torch.tensor([[a, b]]) * sp.masks["weight"])


def test_filter_sampler_matches_enumerated_gibbs_distribution():
    # one group of two weights: H(m) = h1 m1 + h2 m2 - (c/2) * 2 * x1 x2, x = 2m - 1
    h = torch.tensor([0.4, -0.6])
    c, temperature = 0.7, 0.8
    states = list(itertools.product([0, 1], repeat=2))
    energy = {s: float(h[0]) * s[0] + float(h[1]) * s[1] - (c / 2) * 2 * (2 * s[0] - 1) * (2 * s[1] - 1) for s in states}
    z = sum(math.exp(-energy[s] / temperature) for s in states)
    prob = {s: math.exp(-energy[s] / temperature) / z for s in states}
    chains = 40000
    fields = h.expand(chains, 2).contiguous()
    gen = torch.Generator().manual_seed(0)
    m = sample_filter(fields, torch.ones(chains, 2, dtype=torch.bool), temperature, c, 30, gen)
    for s in states:
        got = ((m[:, 0] == bool(s[0])) & (m[:, 1] == bool(s[1]))).float().mean().item()
        assert got == pytest.approx(prob[s], abs=0.008), s
    # the coupling matters: the masks agree more often than independent draws would
    independent = _sigmoid(-float(h[0]) / temperature) * _sigmoid(-float(h[1]) / temperature)
    assert prob[(1, 1)] > independent + 0.05


def test_low_temperature_gives_the_magnitude_mask_of_the_hamiltonian_minimum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    sp = GibbsPruning(model, sparsity=0.75, total_steps=10, seed=1)
    ground = sp.ground_state()
    for name, w in sp.dense.items():
        k = w.numel() - round(0.75 * w.numel())
        expected = torch.zeros(w.numel(), dtype=torch.bool)
        expected[w.abs().reshape(-1).topk(k).indices] = True
        assert torch.equal(ground[name].reshape(-1), expected)
        for _ in range(5):
            assert torch.equal(sp.sample(1e-6)[name], ground[name])
    # while at T = 1 the draws are random
    assert any(not torch.equal(sp.sample(1.0)[n], ground[n]) for n in ground)


def test_filter_low_temperature_keeps_whole_units_of_largest_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    sp = GibbsPruning(model, sparsity=0.5, total_steps=10, hamiltonian="filter", coupling=4.0, sweeps=20,
                      exclude=["3.weight"], seed=0)
    w = sp.dense["0.weight"]
    norms = (w ** 2).reshape(8, -1).mean(1)
    kept = set(norms.topk(4).indices.tolist())
    sample = sp.sample(1e-4)["0.weight"].reshape(8, -1)
    assert {i for i in range(8) if sample[i].all()} == kept
    assert not sample[[i for i in range(8) if i not in kept]].any()


def _train(sp, model, opt, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, *model.in_shape, generator=gen)
        y = torch.randint(0, 4, (16,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10), nn.ReLU(), nn.Linear(10, 4))
    model.in_shape = (20,)
    return model


def test_unstructured_training_ends_at_exact_sparsity_with_the_ground_state_mask():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = GibbsPruning(model, opt, sparsity=0.9, total_steps=40, seed=0)
    _train(sp, model, opt, 20)
    assert not sp.finished
    _train(sp, model, opt, 20, seed=1)
    assert sp.finished
    for name, m in sp.masks.masks.items():
        assert int(m.sum()) == m.numel() - round(0.9 * m.numel()), name
        assert torch.equal(m, sp.ground_state()[name])
        assert not model.get_parameter(name)[~m].any()
    assert sp.history[-1]["kind"] == "prune" and sp.history[-1]["target"] == 0.9
    # training on after the end keeps the mask
    masks = {n: m.clone() for n, m in sp.masks.masks.items()}
    _train(sp, model, opt, 3, seed=2)
    assert all(torch.equal(masks[n], sp.masks.masks[n]) for n in masks)


def test_masked_weights_keep_their_values_and_come_back():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = GibbsPruning(model, opt, sparsity=0.5, total_steps=100, temperature=2.0, final_temperature=1.0, seed=0)
    first = {n: m.clone() for n, m in sp.masks.masks.items()}
    _train(sp, model, opt, 5)
    revived = sum(int((~first[n] & m).sum()) for n, m in sp.masks.masks.items())
    assert revived > 0
    for name, p in sp.masks.params.items():
        m = sp.masks.masks[name]
        assert torch.equal(p[m], sp.dense[name][m])
        assert (sp.dense[name][~m] != 0).any()  # masked, not zeroed in the dense copy


def test_filter_training_removes_whole_neurons_at_exact_sparsity():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = GibbsPruning(model, opt, sparsity=0.8, total_steps=30, hamiltonian="filter", exclude=["4.weight"], seed=0)
    _train(sp, model, opt, 30)
    assert sp.finished
    for name, rows in (("0.weight", 30), ("2.weight", 10)):
        m = sp.masks.masks[name]
        alive = m.all(dim=1)
        assert torch.equal(m, alive[:, None].expand_as(m))  # whole rows only
        assert int(alive.sum()) == rows - round(0.8 * rows)
    assert sp.sparsity == pytest.approx(0.8, abs=1e-12)


def test_state_dict_resumes_the_same_run():
    def run(split):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sp = GibbsPruning(model, opt, sparsity=0.9, total_steps=12, seed=3)
        _train(sp, model, opt, split)
        if split < 12:
            state = sp.state_dict()
            weights = {k: v.clone() for k, v in model.state_dict().items()}
            sp.close()
            model2 = _mlp()
            model2.load_state_dict(weights)
            opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
            sp2 = GibbsPruning(model2, opt2, sparsity=0.9, total_steps=12, seed=3)
            sp2.load_state_dict(state)
            return model2, sp2, opt2
        return model, sp, opt

    m1, s1, _ = run(12)
    m2, s2, o2 = run(6)
    # continue the interrupted one with the same batches as steps 7..12 of the full run
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 20, generator=gen), torch.randint(0, 4, (16,), generator=gen)) for _ in range(12)]
    for x, y in batches[6:]:
        loss = nn.functional.cross_entropy(m2(x), y)
        o2.zero_grad()
        loss.backward()
        o2.step()
        s2.step()
    assert s2.finished and s1.finished
    for n in s1.masks.names():
        assert torch.equal(s1.masks[n], s2.masks[n])
        assert torch.allclose(m1.get_parameter(n), m2.get_parameter(n))


def test_geometric_cooling():
    c = GeometricCooling(initial=1.0, final=1e-4, start=0, end=100)
    assert c.temperature_at(0) == 1.0 and c.temperature_at(100) == pytest.approx(1e-4)
    assert c.temperature_at(50) == pytest.approx(1e-2)
    assert c.temperature_at(500) == pytest.approx(1e-4)
    assert geometric_temperature(25, 1.0, 1e-4, 0, 100) == pytest.approx(0.1)


def test_a_schedule_that_never_cools_is_refused_with_the_fix():
    for final in (1.0, 2.0):
        with pytest.raises(ConfigError, match=r"never cools.*final temperature.*>= initial 1.*give a final temperature "
                                              r"below the initial one, e\.g\. initial=1, final=0\.001"):
            GibbsPruning(_mlp(), sparsity=0.9, total_steps=10, temperature=1.0, final_temperature=final)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0.0), r"initial temperature must be a finite number > 0, got 0\.0"),
    (dict(final_temperature=-1e-3), r"final temperature must be a finite number > 0"),
    (dict(temperature=float("nan")), r"initial temperature must be a finite number > 0"),
    (dict(hamiltonian="kernel"), r"hamiltonian must be one of unstructured, filter, got 'kernel'"),
    (dict(coupling=0), r"coupling must be a finite number > 0"),
    (dict(sweeps=0), r"sweeps must be an integer >= 1"),
    (dict(scope="global"), r"scope must be 'uniform', got 'global'"),
    (dict(sparsity=0.0), r"sparsity 0 prunes nothing"),
    (dict(sparsity=1.0), r"sparsity must be in \[0, 1\)"),
    (dict(end="200%"), r"end='200%' is step 20, past the end of training"),
    (dict(end=0), r"end=0 is step 0: the temperature needs steps to cool"),
    (dict(every=0), r"every=0 must be between 1 step and end"),
    (dict(total_steps=0), r"total_steps must be the number of training steps"),
])
def test_bad_params_are_refused(kwargs, message):
    args = dict(sparsity=0.9, total_steps=10)
    args.update(kwargs)
    with pytest.raises(ConfigError, match=message):
        GibbsPruning(_mlp(), **args)


def test_registered_for_configs():
    assert METHODS.get("gibbs") is GibbsPruning
    assert GibbsPruning.timing == "during"
