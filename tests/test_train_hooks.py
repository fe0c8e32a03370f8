"""The Trainer's hooks: loss_fn, extra optimizers, after-step hooks, stop() from a step
callback and extra state, each checked against a hand-written loop or an uninterrupted run."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from secateurs.errors import CheckpointError, ConfigError
from secateurs.train import OptimizerConfig, TrainConfig, Trainer, build_optimizer, load_checkpoint
from test_train import make_data, make_eval, mlp, params_equal, strip_time

LR = OptimizerConfig(name="sgd", lr=0.05, momentum=0.9)


def cfg(epochs=2, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("optimizer", LR)
    kw.setdefault("health", "off")
    return TrainConfig(epochs=epochs, seed=5, **kw)


class Scale:
    """A penalty weight that doubles at every 4th step (a stand-in for SNL's lambda)."""

    def __init__(self):
        self.value, self.updates = 0.01, 0

    def state_dict(self):
        return {"value": self.value, "updates": self.updates}

    def load_state_dict(self, state):
        self.value, self.updates = state["value"], state["updates"]


def hooked(model, epochs, path=None, scale=None, stop_at=None, data_seed=0):
    """Main SGD on the first layer and the head; Adam on the first layer's bias only,
    clamped to [-0.1, 0.1] after each step; loss CE + scale * ||W1||_1."""
    scale = scale or Scale()
    bias = model[0].bias
    main = build_optimizer([p for p in model.parameters() if p is not bias], LR)
    extra = torch.optim.Adam([bias], lr=0.01)

    def loss_fn(m, logits, y):
        return F.cross_entropy(logits, y) + scale.value * m[0].weight.abs().sum()

    def clamp(trainer):
        with torch.no_grad():
            trainer.model[0].bias.clamp_(-0.1, 0.1)

    def grow(trainer):
        if trainer.state.step % 4 == 0:
            scale.value *= 2
            scale.updates += 1
        if stop_at is not None and trainer.state.step == stop_at:
            trainer.stop()

    trainer = Trainer(
        model, make_data(seed=data_seed), cfg(epochs), optimizer=main, checkpoint_path=path, progress=False,
        loss_fn=loss_fn, extra_optimizers=[extra], after_step=[clamp], step_callbacks=[grow],
        extra_state={"scale": scale},
    )
    return trainer, scale


def test_the_default_loss_is_cross_entropy_with_label_smoothing():
    plain = Trainer(mlp(), make_data(), cfg(2, label_smoothing=0.1), eval_data=make_eval(), progress=False)
    explicit = Trainer(
        mlp(), make_data(), cfg(2, label_smoothing=0.1), eval_data=make_eval(), progress=False,
        loss_fn=lambda m, logits, y: F.cross_entropy(logits, y, label_smoothing=0.1),
    )
    assert strip_time(plain.fit()) == strip_time(explicit.fit())
    assert params_equal(plain.model, explicit.model)


def test_hooks_match_a_hand_written_loop():
    trainer, scale = hooked(mlp(), epochs=2)
    trainer.fit()

    model = mlp()  # the oracle: the same steps written out
    bias = model[0].bias
    main = build_optimizer([p for p in model.parameters() if p is not bias], LR)
    extra = torch.optim.Adam([bias], lr=0.01)
    value, step = 0.01, 0
    data = make_data()
    model.train()
    for _ in range(2):
        for x, y in data:
            loss = F.cross_entropy(model(x), y) + value * model[0].weight.abs().sum()
            main.zero_grad(set_to_none=True)
            extra.zero_grad(set_to_none=True)
            loss.backward()
            main.step()
            extra.step()
            with torch.no_grad():
                bias.clamp_(-0.1, 0.1)
            step += 1
            if step % 4 == 0:
                value *= 2
    assert step == trainer.state.step == 16 and scale.value == value
    assert params_equal(trainer.model, model)
    assert bias.abs().max() <= 0.1


def test_resume_with_hooks_is_bit_identical(tmp_path):
    full, full_scale = hooked(mlp(), epochs=3, path=tmp_path / "full.pt")
    records = full.fit()
    first, _ = hooked(mlp(), epochs=1, path=tmp_path / "part.pt")
    first.fit()
    saved = load_checkpoint(tmp_path / "part.pt")
    assert saved["extra_state"] == {"scale": {"value": 0.01 * 2 ** 2, "updates": 2}} and len(saved["extra_optimizers"]) == 1

    resumed, scale = hooked(mlp(seed=9), epochs=3, path=tmp_path / "part.pt", data_seed=4)
    assert resumed.resume() and resumed.state.step == 8 and scale.updates == 2
    assert strip_time(resumed.fit()) == strip_time(records)
    assert params_equal(full.model, resumed.model) and scale.state_dict() == full_scale.state_dict()
    a, b = full.extra_optimizers[0].state_dict()["state"], resumed.extra_optimizers[0].state_dict()["state"]
    assert all(torch.equal(a[k][n], b[k][n]) for k in a for n in a[k])


def test_stop_from_a_step_callback_ends_training_for_good(tmp_path):
    path = tmp_path / "stop.pt"
    trainer, _ = hooked(mlp(), epochs=4, path=path, stop_at=11)  # 8 steps per epoch: mid epoch 2
    records = trainer.fit()
    assert [r["step"] for r in records] == [8, 11] and trainer.state.epoch == 2 and trainer.stopped
    assert load_checkpoint(path)["stopped"] is True

    again, _ = hooked(mlp(seed=3), epochs=4, path=path)
    assert again.resume() and again.stopped
    assert strip_time(again.fit()) == strip_time(records) and again.state.step == 11
    assert params_equal(again.model, trainer.model)


def test_a_plain_checkpoint_keeps_its_keys_and_refuses_a_hooked_trainer(tmp_path):
    model = mlp()
    main = build_optimizer([p for p in model.parameters() if p is not model[0].bias], LR)  # as hooked() builds it
    plain = Trainer(model, make_data(), cfg(1), optimizer=main, checkpoint_path=tmp_path / "plain.pt", progress=False)
    plain.fit()
    assert set(load_checkpoint(tmp_path / "plain.pt")) == {
        "format", "format_version", "model", "optimizer", "lr_schedule", "sparsifier", "train_data",
        "train_state", "history", "evaluations", "health", "rng", "config",
    }
    trainer, _ = hooked(mlp(), epochs=2, path=tmp_path / "plain.pt")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"0 extra optimizer\(s\).*pass the same extra_optimizers"):
        trainer.resume()
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())  # nothing loaded

    hooked(mlp(), epochs=1, path=tmp_path / "hooked.pt")[0].fit()
    renamed, _ = hooked(mlp(), epochs=2, path=tmp_path / "hooked.pt")
    renamed.extra_state = {"other": renamed.extra_state["scale"]}
    with pytest.raises(CheckpointError, match=r"extra_state \['scale'\] but this trainer has \['other'\]"):
        renamed.resume()


def test_bad_hooks_are_refused():
    model = mlp()
    with pytest.raises(ConfigError, match="loss_fn must be a callable"):
        Trainer(model, make_data(), cfg(), loss_fn="mse", progress=False)
    with pytest.raises(ConfigError, match=r"extra_optimizers\[0\] \(dict\) lacks"):
        Trainer(model, make_data(), cfg(), extra_optimizers=[{}], progress=False)
    with pytest.raises(ConfigError, match="in both optimizer and extra_optimizers\\[0\\].*stepped twice"):
        Trainer(model, make_data(), cfg(), extra_optimizers=[torch.optim.Adam(model[0].parameters())], progress=False)
    with pytest.raises(ConfigError, match=r"after_step\[0\] is 3, not a callable"):
        Trainer(model, make_data(), cfg(), after_step=[3], progress=False)
    with pytest.raises(ConfigError, match=r"extra_state\['n'\] \(int\) lacks \['state_dict', 'load_state_dict'\]"):
        Trainer(model, make_data(), cfg(), extra_state={"n": 1}, progress=False)
    per_sample = Trainer(model, make_data(), cfg(), loss_fn=lambda m, logits, y: F.cross_entropy(logits, y, reduction="none"),
                         progress=False)
    with pytest.raises(ConfigError, match=r"scalar tensor, got Tensor of shape \(32,\); reduce it"):
        per_sample.fit()


def test_extra_optimizers_are_clipped_with_the_main_one():
    model = mlp()
    bias = model[0].bias
    main = torch.optim.SGD([p for p in model.parameters() if p is not bias], lr=0.0)
    extra = torch.optim.SGD([bias], lr=1.0)
    seen = []
    trainer = Trainer(
        model, make_data(), cfg(1, grad_clip=1e-3), optimizer=main, extra_optimizers=[extra], progress=False,
        loss_fn=lambda m, logits, y: 1e3 * F.cross_entropy(logits, y),
        after_step=[lambda t: seen.append(torch.cat([p.grad.reshape(-1) for p in t.model.parameters()]).norm())],
    )
    start = bias.detach().clone()
    trainer.fit()
    assert all(float(n) <= 1e-3 * (1 + 1e-5) for n in seen)  # the norm over all parameters is clipped
    assert (bias - start).abs().max() <= 8 * 1e-3 * (1 + 1e-5)  # lr 1, 8 steps of a gradient of norm <= 1e-3
