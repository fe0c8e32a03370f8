"""Pruning at initialisation: SNIP, GraSP, SynFlow, random_init, sanity checks and resets."""
import copy

import pytest
import torch
from torch import nn

from secateurs.allocation import keep_count
from secateurs.errors import ConfigError, UnknownNameError
from secateurs.methods import METHODS, SNIP, GraSP, RandomInit, SynFlow
from secateurs.models.mlp import MLP
from secateurs.resets import reinitialize_, rewind_, shuffle_within_layers, snapshot
from secateurs.scores import grasp, snip, synflow


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run tiny models: one intra-op thread is faster, and much faster on a busy
    machine, than contending for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def two_layer_linear(dtype=torch.float64):
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False)).to(dtype)


def batch(n=5, d=4, classes=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


def small_cnn():
    """Conv + two linear layers on 8x8 inputs: shapes differ enough for ERK to matter."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 10)
    )


def image_batches(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))]
    return lambda: iter(data)


def weights_of(model):
    return {n: p for n, p in model.named_parameters() if n.endswith("weight")}


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# -- the scores against independent computations --------------------------------------------

def test_snip_equals_hand_computed_connection_sensitivity():
    model = two_layer_linear()
    with torch.no_grad():
        model[0].weight[0, 1] = 0.0  # a pruned weight: the masked network is what is scored
    batches = [batch(seed=0), batch(seed=1)]
    w1, w2 = model[0].weight.detach(), model[1].weight.detach()
    g1, g2 = torch.zeros_like(w1), torch.zeros_like(w2)
    for x, y in batches:  # z = W2 W1 x, mean cross-entropy: dL/dz = (softmax(z) - onehot(y)) / N
        h = x @ w1.T
        z = h @ w2.T
        delta = (torch.softmax(z, dim=1) - nn.functional.one_hot(y, 2).to(z.dtype)) / len(y)
        g2 += delta.T @ h
        g1 += (delta @ w2).T @ x
    scores = snip(model, weights_of(model), batches)
    assert torch.allclose(scores["0.weight"], (g1 * w1).abs(), atol=1e-12)
    assert torch.allclose(scores["1.weight"], (g2 * w2).abs(), atol=1e-12)
    assert scores["0.weight"][0, 1] == 0


def test_grasp_keep_score_is_theta_times_hessian_gradient_and_its_sign_is_graSP():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = batch(n=6, d=3, seed=2)
    T = 200.0
    names = ["0.weight", "2.weight"]
    shapes = [model.get_parameter(n).shape for n in names]
    theta = torch.cat([model.get_parameter(n).detach().reshape(-1) for n in names])

    def loss(flat):
        a, b = flat[: shapes[0].numel()].view(shapes[0]), flat[shapes[0].numel():].view(shapes[1])
        h = torch.tanh(x @ a.T + model[0].bias.detach())
        return nn.functional.cross_entropy((h @ b.T + model[2].bias.detach()) / T, y)

    g = torch.autograd.functional.jacobian(loss, theta)
    hessian = torch.autograd.functional.hessian(loss, theta)
    expected = theta * (hessian @ g)
    scores = grasp(model, weights_of(model), [(x, y)], temperature=T)
    got = torch.cat([scores[n].reshape(-1) for n in names])
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-14)

    # sign: removing a little of weight q (theta_q -> (1 - eps) theta_q) changes the gradient norm
    # g^T g by -2 eps * keep_score_q, so the lowest keep scores are the removals that raise it most
    def grad_norm(flat):
        return torch.autograd.functional.jacobian(loss, flat).pow(2).sum()

    eps, base = 1e-4, grad_norm(theta)
    for q in (0, 5, 13, 19):
        step = torch.zeros_like(theta)
        step[q] = -eps * theta[q]
        assert torch.allclose((grad_norm(theta + step) - base) / eps, -2 * expected[q], rtol=1e-3, atol=1e-16)


def test_synflow_equals_the_closed_form_and_restores_the_model():
    model = two_layer_linear().float()
    model[0].weight.grad = torch.ones(3, 4)
    before, grad_before = state(model), model[0].weight.grad.clone()
    scores = synflow(model, weights_of(model), (4,))
    a1, a2 = model[0].weight.detach().double().abs(), model[1].weight.detach().double().abs()
    # R = 1^T |W2| |W1| 1: dR/d|W1|_ij = (1^T |W2|)_i, dR/d|W2|_ki = (|W1| 1)_i
    assert torch.allclose(scores["0.weight"], a1 * a2.sum(0)[:, None], rtol=1e-12)
    assert torch.allclose(scores["1.weight"], a2 * a1.sum(1)[None, :], rtol=1e-12)
    assert scores["0.weight"].dtype == torch.float64
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model[0].weight.grad, grad_before) and model[1].weight.grad is None


def test_synflow_masks_do_not_depend_on_the_data():
    masks = []
    for seed in (0, 1):
        sp = SynFlow(small_cnn(), batches=image_batches(seed), rounds=5)
        sp.prune(0.9)
        masks.append(sp.masks.masks)
    given = SynFlow(small_cnn(), input_shape=(1, 8, 8), rounds=5)
    given.prune(0.9)
    for other in (masks[1], given.masks.masks):
        assert all(torch.equal(masks[0][n], other[n]) for n in masks[0])


def bn_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def test_synflow_scores_batch_norm_in_eval_mode_and_restores_the_mode():
    train_model, eval_model = bn_model(), bn_model().eval()
    train_model[3].eval()  # a mixed-mode model: each module's own flag must come back
    before = state(train_model)
    a = synflow(train_model, weights_of(train_model), (1, 8, 8))
    b = synflow(eval_model, weights_of(eval_model), (1, 8, 8))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert [m.training for m in train_model.modules()] == [True, True, True, True, False, True]
    assert all(torch.equal(before[k], v) for k, v in train_model.state_dict().items()), "running stats untouched"


@pytest.mark.parametrize("score", ["snip", "grasp"])
def test_data_scores_leave_parameters_buffers_grads_modes_and_rng_as_they_were(score):
    model = nn.Sequential(bn_model(), nn.Dropout(0.5))
    model[0][4].weight.grad = torch.full_like(model[0][4].weight, 0.5)
    model[0][3].eval()
    before, modes, rng = state(model), [m.training for m in model.modules()], torch.get_rng_state()
    x, y = next(image_batches()())
    fn = snip if score == "snip" else grasp
    fn(model, weights_of(model), [(x, y % 3)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(model[0][4].weight.grad, torch.full_like(model[0][4].weight, 0.5))
    assert model[0][0].weight.grad is None
    assert torch.equal(torch.get_rng_state(), rng)


# -- the methods ------------------------------------------------------------------------------

def make(method, model, **kw):
    extra = {"rounds": 5} if method == "synflow" else {}
    return METHODS.get(method)(model, batches=image_batches(), **extra, **kw)


def test_at_init_methods_are_registered_with_timing_init():
    for name in ("snip", "grasp", "synflow", "random_init"):
        assert METHODS.get(name).timing == "init"
    assert METHODS.get("random").timing == "after"
    assert RandomInit(small_cnn()).scope == "erk" and SNIP(small_cnn()).scope == "global"


@pytest.mark.parametrize("scope", ["global", "erk", "uniform"])
@pytest.mark.parametrize("method", ["snip", "grasp", "synflow", "random_init"])
def test_achieved_sparsity_is_exact(method, scope):
    sp = make(method, small_cnn(), scope=scope)
    stats = sp.prune(0.9)
    layers = stats["layers"]
    if scope == "uniform":
        assert all(v["active"] == keep_count(v["numel"], 0.9) for v in layers.values())
    else:
        assert stats["active"] == keep_count(stats["numel"], 0.9)
    for name, p in weights_of(sp.model).items():
        assert torch.count_nonzero(p[~sp.masks[name]]) == 0
    assert len(sp.history) == 1


@pytest.mark.parametrize("pins", [{"keep_dense": ["5.weight"]}, {"layer_sparsity": {"0.weight": 0.5}}])
def test_synflow_rounds_respect_pinned_layers_and_reach_the_exact_count(pins):
    sp = SynFlow(small_cnn(), input_shape=(1, 8, 8), rounds=10, **pins)
    stats = sp.prune(0.9)
    assert stats["active"] == keep_count(stats["numel"], 0.9)
    name, sparsity = ("5.weight", 0.0) if "keep_dense" in pins else ("0.weight", 0.5)
    layer = stats["layers"][name]
    assert layer["active"] == keep_count(layer["numel"], sparsity)
    assert sp.history[-1]["rounds"] == 10


def test_a_failed_prune_leaves_model_masks_and_history_as_they_were(monkeypatch):
    import secateurs.methods.at_init as at_init

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(at_init, "reinitialize_", broken)
    model = small_cnn()
    before = state(model)
    sp = SynFlow(model, input_shape=(1, 8, 8), rounds=5, sanity_check="reinit")
    with pytest.raises(RuntimeError, match="boom"):
        sp.prune(0.9)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sp.masks.sparsity() == 0.0 and sp.history == []


def test_synflow_keeps_every_layer_of_a_deep_mlp_where_snip_collapses_one():
    torch.manual_seed(0)
    dense = MLP(32, (100,) * 7, 10)  # 8 linear layers, 64,200 weights; 99.9% keeps 64
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g))]
    sp = SynFlow(copy.deepcopy(dense), input_shape=(32,))
    stats = sp.prune(0.999)
    assert stats["active"] == 64
    assert all(v["active"] > 0 for v in stats["layers"].values())
    # and the kept weights still connect input to output: the path norm of the masks is > 0
    signal = torch.ones(32)
    for name in sp.masks.names():
        signal = sp.masks[name].float() @ signal
    assert signal.sum() > 0
    # Observed with this seed: SNIP's global threshold empties net.3.weight (the second layer;
    # its other layers keep 3, 6, 5, 15, 8, 6, 21), so without allow_layer_collapse it refuses,
    # names the layer, and leaves the model untouched.
    snip_model = copy.deepcopy(dense)
    with pytest.raises(ConfigError, match=r"removes every weight of net\.3\.weight"):
        SNIP(snip_model, batches=lambda: data).prune(0.999)
    assert all(torch.equal(a, b) for a, b in zip(snip_model.state_dict().values(), dense.state_dict().values()))
    collapsed = SNIP(copy.deepcopy(dense), batches=lambda: data, allow_layer_collapse=True).prune(0.999)
    assert collapsed["layers"]["net.3.weight"]["active"] == 0


def test_missing_or_empty_data_gives_a_clear_error():
    with pytest.raises(ConfigError, match="empty iterable"):
        SNIP(small_cnn(), batches=lambda: []).prune(0.9)
    with pytest.raises(ConfigError, match="needs data: pass batches="):
        GraSP(small_cnn()).prune(0.9)
    with pytest.raises(ConfigError, match="input_shape=.*or batches="):
        SynFlow(small_cnn()).prune(0.9)
    with pytest.raises(ConfigError, match="at least one"):
        snip(small_cnn(), weights_of(small_cnn()), [])


def test_bad_parameters_are_refused_with_the_known_names():
    with pytest.raises(UnknownNameError, match="known sanity checks: layer_shuffle, reinit"):
        SNIP(small_cnn(), sanity_check="shuffle")
    with pytest.raises(ConfigError, match="synflow rounds must be an integer >= 1, got 0"):
        SynFlow(small_cnn(), rounds=0)
    with pytest.raises(ConfigError, match=r"each synflow input_shape size must be an integer >= 1, got True \(bool\)"):
        SynFlow(small_cnn(), input_shape=[1, True, 28])


# -- sanity checks and resets -----------------------------------------------------------------

def test_layer_shuffle_keeps_per_layer_counts_and_initial_values_but_moves_positions():
    initial = state(small_cnn())
    plain = make("snip", small_cnn())
    plain.prune(0.8)
    shuffled = make("snip", small_cnn(), sanity_check="layer_shuffle")
    shuffled.prune(0.8)
    assert shuffled.masks.active() == plain.masks.active()
    for name in plain.masks.names():
        assert not torch.equal(shuffled.masks[name], plain.masks[name])
        w, m = shuffled.model.get_parameter(name), shuffled.masks[name]
        assert torch.equal(w[m], initial[name][m]), "kept weights carry their initial values"
        assert torch.count_nonzero(w[~m]) == 0
    assert shuffled.history[-1]["sanity_check"] == "layer_shuffle"


def test_reinit_keeps_the_mask_redraws_the_kept_weights_and_is_seeded():
    initial = state(small_cnn())
    plain = make("snip", small_cnn())
    plain.prune(0.8)
    runs = []
    for seed in (0, 0, 1):
        sp = make("snip", small_cnn(), sanity_check="reinit", seed=seed)
        sp.prune(0.8)
        runs.append(sp)
    for name in plain.masks.names():
        m = plain.masks[name]
        assert torch.equal(runs[0].masks[name], m)
        w = runs[0].model.get_parameter(name)
        assert not torch.equal(w[m], initial[name][m])
        assert torch.count_nonzero(w[~m]) == 0
        assert torch.equal(w, runs[1].model.get_parameter(name))
        assert not torch.equal(w, runs[2].model.get_parameter(name))


def test_reinitialize_draws_from_the_module_init_without_touching_the_global_rng():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(400, 50))
    rng = torch.get_rng_state()
    reinitialize_(layer, ["0.weight"], torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), rng)
    w = layer[0].weight.detach()
    bound = 1 / 400**0.5  # nn.Linear's reset_parameters: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    reinitialize_(layer, ["0.weight"], torch.Generator().manual_seed(5), init="xavier_normal")
    assert abs(layer[0].weight.std().item() - (2 / 450) ** 0.5) < 0.005


def test_rewind_is_bit_exact_and_shuffle_is_pure():
    model = small_cnn()
    saved = snapshot(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3).add_(1)
    rewind_(model, saved)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="bit for bit"):
        rewind_(model, {"0.weight": saved["0.weight"].double()})
    masks = {"a": torch.rand(10, 10) < 0.3}
    before = masks["a"].clone()
    out = shuffle_within_layers(masks, torch.Generator().manual_seed(0))
    assert torch.equal(masks["a"], before) and out["a"].sum() == before.sum()


# -- through the experiment runner -------------------------------------------------------------

def test_snip_through_the_experiment_runner_reaches_the_exact_sparsity(tmp_path):
    from secateurs.experiments import RunDir, load_config
    from secateurs.experiments.sweep import run_sweep

    config = load_config(None, {
        "name": "snip-tiny", "data.dataset": "digits", "data.batch_size": 64, "data.eval_batch_size": 512,
        "model.name": "lenet300_100", "train.epochs": 1, "prune.method": "snip",
        "prune.sparsities": [0.9], "prune.dense_baseline": False,
    })
    run = RunDir.for_config(config, tmp_path / "runs")
    results = run_sweep(config, run, progress=False, echo=lambda s: None)
    (row,) = results["levels"]
    assert results["timing"] == "init"
    assert row["active"] == keep_count(row["numel"], 0.9)
    assert row["test_acc"] > 0.5
