"""The sparsity state and the sparsifier on a user's own model and optimizer."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import secateurs
from secateurs.allocation import keep_count
from secateurs.errors import CheckpointError, ConfigError
from secateurs.masks import Masks


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


def cnn():
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


def train_steps(model, opt, sparsifier, n, x_shape=(16, 64)):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        x = torch.randn(*x_shape, generator=g)
        y = torch.randint(0, 4, (x_shape[0],), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sparsifier.step()


def test_default_prunable_are_conv_and_linear_weights():
    assert Masks(cnn()).names() == ["0.weight", "4.weight"]


def test_include_and_exclude_by_pattern():
    assert Masks(mlp(), include=["*.bias"]).names() == ["1.bias", "3.bias", "5.bias"]
    assert Masks(mlp(), exclude=["5.*"]).names() == ["1.weight", "3.weight"]


def test_no_prunable_parameters_is_a_clear_error():
    with pytest.raises(ConfigError, match="has no prunable parameters"):
        Masks(nn.Sequential(nn.BatchNorm1d(4), nn.ReLU()))


def test_include_pattern_matching_nothing_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"include pattern 'encoder\.\*' matches no parameter"):
        Masks(mlp(), include=["encoder.*"])


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_pruned_weights_grads_and_optimizer_state_stay_zero(opt_name):
    model = mlp()
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        if opt_name == "sgd"
        else torch.optim.Adam(model.parameters(), lr=1e-2)
    )
    sp = secateurs.Magnitude(model, opt, sparsity=0.8, scope="global")
    train_steps(model, opt, sp, 2)  # create optimizer state before pruning
    sp.prune()
    train_steps(model, opt, sp, 5)
    for name, p in sp.masks.params.items():
        pruned = ~sp.masks[name]
        assert pruned.any()
        assert (p[pruned] == 0).all()
        assert (p.grad[pruned] == 0).all()
        for value in opt.state[p].values():
            if torch.is_tensor(value) and value.shape == p.shape:
                assert (value[pruned] == 0).all()
        assert (p[~pruned] != 0).any(), "kept weights must still train"
    assert sp.sparsity == pytest.approx(1 - keep_count(64 * 32 + 32 * 16 + 16 * 4, 0.8) / (64 * 32 + 32 * 16 + 16 * 4))


def test_global_magnitude_keeps_the_largest_weights_exactly():
    model = mlp()
    total = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    flat_before = torch.cat([p.detach().abs().reshape(-1) for n, p in model.named_parameters() if n.endswith("weight")])
    stats = secateurs.Magnitude(model, sparsity=0.9).prune()
    assert stats["active"] == keep_count(total, 0.9)
    flat_after = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if n.endswith("weight")])
    kept = flat_after != 0
    assert flat_before[kept].min() >= flat_before[~kept].max()


def test_gradual_schedule_hits_the_target_at_every_update():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = secateurs.Cubic(final=0.9, start=2, end=12, every=2)
    sp = secateurs.Magnitude(model, opt, schedule=sched, scope="uniform")
    train_steps(model, opt, sp, 14)
    steps = [h["step"] for h in sp.history]
    assert steps == [4, 6, 8, 10, 12]  # at step 2 the target is the initial 0: nothing to prune
    for h in sp.history:
        assert h["sparsity"] == pytest.approx(h["target"], abs=1 / 16)  # uniform: per-layer rounding
    numel = sp.masks.numel()
    assert sp.masks.active() == {n: keep_count(c, 0.9) for n, c in numel.items()}


def test_random_pruning_is_seeded():
    a = secateurs.Random(mlp(), sparsity=0.5, scope="erk", seed=3)
    b = secateurs.Random(mlp(), sparsity=0.5, scope="erk", seed=3)
    c = secateurs.Random(mlp(), sparsity=0.5, scope="erk", seed=4)
    a.prune(), b.prune(), c.prune()
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    assert not all(torch.equal(a.masks[n], c.masks[n]) for n in a.masks)


def test_state_dict_round_trip_and_wrong_model():
    model = mlp()
    sp = secateurs.Magnitude(model, sparsity=0.7)
    sp.prune()
    state = sp.state_dict()
    other = secateurs.Magnitude(mlp(), sparsity=0.7)
    other.load_state_dict(state)
    assert all(torch.equal(other.masks[n], sp.masks[n]) for n in sp.masks)
    assert other.steps == sp.steps and other.history == sp.history
    with pytest.raises(CheckpointError, match="different model"):
        secateurs.Magnitude(cnn()).load_state_dict(state)
    with pytest.raises(CheckpointError, match="not a secateurs"):
        other.load_state_dict({"masks": {}})


def test_keep_dense_and_layer_sparsity_overrides():
    sp = secateurs.Magnitude(mlp(), sparsity=0.8, keep_dense=["5.weight"], layer_sparsity={"1.*": 0.9})
    stats = sp.prune()
    assert stats["layers"]["5.weight"]["sparsity"] == 0.0
    assert stats["layers"]["1.weight"]["active"] == keep_count(2048, 0.9)
    total = 64 * 32 + 32 * 16 + 16 * 4
    assert stats["active"] == keep_count(total, 0.8)
    with pytest.raises(ConfigError, match="matches no prunable parameter"):
        secateurs.Magnitude(mlp(), sparsity=0.8, keep_dense=["head.weight"])


def test_prune_sequence_is_cumulative_and_never_revives():
    sp = secateurs.Magnitude(mlp(), scope="global")
    previous = None
    for s in [0.5, 0.8, 0.9]:
        sp.prune(s)
        if previous is not None:
            assert not any((sp.masks[n] & ~previous[n]).any() for n in sp.masks)
        previous = {n: m.clone() for n, m in sp.masks.masks.items()}
    with pytest.raises(ConfigError, match="never revives"):
        sp.prune(0.5)


def test_masks_follow_the_model_to_another_dtype():
    model = mlp()
    sp = secateurs.Magnitude(model, sparsity=0.5)
    sp.prune()
    model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    sp.masks.apply_()
    assert sp.masks.params["1.weight"].dtype == torch.float64
    assert int((sp.masks.params["1.weight"] != 0).sum()) == int(sp.masks["1.weight"].sum())


def test_library_does_not_import_the_experiment_layer():
    code = (
        "import sys, secateurs; "
        "bad = [m for m in sys.modules if m.startswith(('secateurs.data', 'secateurs.models', "
        "'secateurs.train', 'secateurs.cli', 'matplotlib', 'yaml'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_trainer_clips_the_gradient_norm_of_the_sparse_network():
    """With grad_clip, pruned weights' gradients must not inflate the clipped norm."""
    from secateurs.train import Trainer, TrainConfig

    class Batches:
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.x, self.y = torch.randn(32, 64, generator=g), torch.randint(0, 4, (32,), generator=g)

        def __iter__(self):
            yield self.x, self.y

        def __len__(self):
            return 1

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    model = mlp()
    sp = secateurs.Magnitude(model, sparsity=0.9)
    sp.prune()
    seen = []
    original = nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        params = list(params)
        seen.append(all((p.grad[~sp.masks[n]] == 0).all() for n, p in sp.masks.params.items()))
        return original(params, max_norm, *args, **kwargs)

    nn.utils.clip_grad_norm_ = spy
    try:
        cfg = TrainConfig(epochs=1, optimizer={"name": "sgd", "lr": 0.1}, grad_clip=1.0)
        trainer = Trainer(model, Batches(), cfg, sparsifier=sp, progress=False)
        sp.optimizer = trainer.optimizer
        trainer.fit()
    finally:
        nn.utils.clip_grad_norm_ = original
    assert seen == [True]
