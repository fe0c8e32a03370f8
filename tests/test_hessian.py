"""Hessian-vector products, power iteration, and Hessian-guided neuron pruning during training."""
from __future__ import annotations

import pytest

from secateurs.errors import ConfigError
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from secateurs.analysis.hessian import (
    HessianOperator, HessianUnavailableError, hessian_vector_product, model_hessian, top_eigenvalue,
)


def _tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)


def _explicit_hessian(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(flat):
        chunks = torch.split(flat, [s.numel() for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat0)


def test_hvp_matches_explicit_hessian_times_vector():
    model, (x, y) = _tiny(), _data()
    H = _explicit_hessian(model, x, y)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    op = model_hessian(model, F.cross_entropy, x, y)
    assert torch.allclose(op.matvec(v), H @ v, rtol=1e-10, atol=1e-12)
    # the per-parameter form gives the same product
    params = list(model.parameters())
    chunks = [c.view_as(p) for c, p in zip(torch.split(v, [p.numel() for p in params]), params)]
    per = hessian_vector_product(F.cross_entropy(model(x), y), params, chunks)
    assert torch.allclose(torch.cat([t.reshape(-1) for t in per]), H @ v, rtol=1e-10, atol=1e-12)


def test_power_iteration_matches_eigvalsh():
    model, (x, y) = _tiny(), _data()
    H = _explicit_hessian(model, x, y)
    eig = torch.linalg.eigvalsh(H)
    dominant = eig[eig.abs().argmax()].item()
    result = top_eigenvalue(model_hessian(model, F.cross_entropy, x, y), max_iter=5000, tol=1e-12, seed=0)
    assert result.converged
    assert result.eigenvalue == pytest.approx(dominant, rel=1e-8)
    assert result.spectral_radius == pytest.approx(eig.abs().max().item(), rel=1e-8)
    # the vector is an eigenvector: H v = lambda v
    assert torch.allclose(H @ result.vector, dominant * result.vector, atol=1e-5)


def test_power_iteration_is_seeded_and_stops_at_tol():
    model, (x, y) = _tiny(), _data()
    op = model_hessian(model, F.cross_entropy, x, y)
    a, b = top_eigenvalue(op, tol=1e-3, seed=7), top_eigenvalue(op, tol=1e-3, seed=7)
    assert a.eigenvalue == b.eigenvalue and a.iterations == b.iterations
    tight = top_eigenvalue(op, tol=1e-10, seed=7, max_iter=5000)
    assert a.iterations < tight.iterations
    capped = top_eigenvalue(op, tol=1e-14, seed=7, max_iter=2)
    assert capped.iterations == 2 and not capped.converged


class _Argmax(nn.Module):
    def forward(self, x):
        return x.argmax(dim=1, keepdim=True).to(x.dtype)


def test_argmax_module_is_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), _Argmax(), nn.Linear(1, 3)).double()
    x, y = _data()
    with pytest.raises(HessianUnavailableError, match=r"no gradient with respect to 0\.weight.*module '1' \(_Argmax\)"):
        model_hessian(model, F.cross_entropy, x, y)


class _Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)).detach())  # functional cut: no module to blame


def test_detached_path_names_the_parameters():
    model, (x, y) = _Detached().double(), _data()
    with pytest.raises(HessianUnavailableError, match=r"no gradient with respect to a\.weight, a\.bias"):
        model_hessian(model, F.cross_entropy, x, y)


def test_loss_without_any_gradient_is_refused():
    model, (x, y) = nn.Sequential(nn.Linear(4, 3), _Argmax()).double(), _data()
    with pytest.raises(HessianUnavailableError, match=r"does not depend differentiably.*module '1' \(_Argmax\)"):
        model_hessian(model, lambda out, t: (out.squeeze(1) - t.double()).pow(2).mean(), x, y)


class _OnceDifferentiable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.tanh()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1 - x.tanh() ** 2)


def test_first_order_only_op_is_refused():
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(4, 5).double(), nn.Linear(5, 3).double()
    x, y = _data()
    loss = F.cross_entropy(lin2(_OnceDifferentiable.apply(lin1(x))), y)
    params = [*lin1.parameters(), *lin2.parameters()]
    with pytest.raises(HessianUnavailableError, match="first-order only.*once_differentiable"):
        op = HessianOperator(loss, params)
        op.matvec(torch.ones(op.numel, dtype=torch.float64))


def test_bad_arguments():
    model, (x, y) = _tiny(), _data()
    op = model_hessian(model, F.cross_entropy, x, y)
    with pytest.raises(ValueError, match="flat vector"):
        op.matvec(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="tol must be > 0"):
        top_eigenvalue(op, tol=0)
    with pytest.raises(HessianUnavailableError, match="scalar"):
        HessianOperator(model(x), list(model.parameters()))


# -- the method: neuron pruning during training ----------------------------------------------
from secateurs.methods.hessian_neurons import HessianNeuronPruning  # noqa: E402
from secateurs.models.mlp import MLP  # noqa: E402
from secateurs.structured import compact_zero_channels  # noqa: E402


def _train(criterion, ratio=0.5, steps=30):
    torch.manual_seed(0)
    model = MLP(8, (12, 6), 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = HessianNeuronPruning(model, opt, ratio=ratio, total_steps=steps, every=5, criterion=criterion,
                                  power_iters=10)
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        pruner.step((x, y))
    return model, opt, pruner


@pytest.mark.parametrize("criterion", ["hessian", "l1"])
def test_method_reaches_exact_neuron_target_and_zeroes_removed(criterion):
    model, opt, pruner = _train(criterion)
    assert pruner.removed == round(0.5 * 18) == 9  # 18 hidden neurons
    assert pruner.steps == 30 and pruner.history[-1]["step"] <= pruner.end == 15
    for name, m in pruner.layers.items():
        dead = ~pruner.alive[name]
        assert dead.sum() < dead.numel()  # min_neurons kept
        assert not m.weight[dead].any() and not m.bias[dead].any()
        assert not opt.state[m.weight]["momentum_buffer"][dead].any()
    if criterion == "hessian":
        assert all(h["rho"] > 0 and h["iterations"] >= 1 for h in pruner.history)
    # removed neurons are dead, so they can be removed physically without changing the outputs
    x = torch.randn(5, 8)
    small = compact_zero_channels(model, x)
    widths = [m.out_features for m in small.modules() if isinstance(m, nn.Linear)][:-1]
    assert sum(widths) == 18 - 9
    assert torch.allclose(small(x), model(x), atol=1e-6)


def test_method_schedule_is_cubic_and_monotone():
    model = MLP(8, (12, 6), 3)
    p = HessianNeuronPruning(model, ratio=0.5, total_steps=100, start=10, end=60, every=10)
    counts = [p.removed_at(t) for t in range(0, 101)]
    assert counts[10] == 0 and counts[60] == counts[100] == 9
    assert counts == sorted(counts)
    assert [t for t in range(101) if p.updates_at(t)] == [20, 30, 40, 50, 60]


def test_method_bad_inputs():
    model = MLP(8, (12, 6), 3)
    with pytest.raises(ConfigError, match=r"ratio must be a number in \[0, 1\), got 1.0 \(float\); the share of hidden"):
        HessianNeuronPruning(model, ratio=1.0, total_steps=10)
    with pytest.raises(ConfigError, match="start < end <= total_steps"):
        HessianNeuronPruning(model, ratio=0.5, total_steps=10, end=20)
    with pytest.raises(ConfigError, match="unknown criterion 'taylor'; known: hessian, l1"):
        HessianNeuronPruning(model, ratio=0.5, total_steps=10, criterion="taylor")
    with pytest.raises(ConfigError, match="min_neurons=6 per layer allows at most 6"):
        HessianNeuronPruning(model, ratio=0.5, total_steps=10, min_neurons=6)
    with pytest.raises(ConfigError, match="neuron pruning needs hidden layers"):
        HessianNeuronPruning(nn.Linear(3, 2), ratio=0.5, total_steps=10)
    with pytest.raises(ConfigError, match="every must be an integer >= 1"):
        HessianNeuronPruning(model, ratio=0.5, total_steps=10, every=0)
    p = HessianNeuronPruning(model, ratio=0.5, total_steps=2, every=1)
    with pytest.raises(ConfigError, match="needs this step's batch"):
        p.step()


def test_layers_come_from_the_registry_with_their_output_axis():
    """GPT-2's Conv1D keeps its output neurons on axis 1: they are found (no isinstance list)
    and zeroed as columns; a matrix module the registry does not know is named, not skipped."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(16, 8), nn.ReLU(), Conv1D(4, 16))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    p = HessianNeuronPruning(model, opt, ratio=0.5, total_steps=4, end=2, every=1)
    assert list(p.layers) == ["0"] and p.neurons == 16
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    for _ in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        p.step((x, y))
    dead = ~p.alive["0"]
    assert int(dead.sum()) == 8
    w = model[0].weight  # [in, out]
    assert torch.count_nonzero(w[:, dead]) == 0 and torch.count_nonzero(model[0].bias[dead]) == 0
    assert torch.count_nonzero(opt.state[w]["momentum_buffer"][:, dead]) == 0
    assert torch.count_nonzero(w[:, ~dead]) > 0

    class Bilinearish(nn.Module):  # a matrix weight in a module the registry does not know
        def __init__(self):
            super().__init__()
            self.hidden, self.mix, self.out = nn.Linear(4, 6), nn.Bilinear(6, 6, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = self.hidden(x)
            return self.out(self.mix(h, h))

    with pytest.warns(UserWarning, match=r"leaves layers of types the layer registry does not know unpruned: mix"):
        HessianNeuronPruning(Bilinearish(), ratio=0.5, total_steps=10)
