"""Tests for secateurs.train: loop, optimizers, LR schedules, checkpoints, resume."""
from __future__ import annotations

import math
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from secateurs.errors import CheckpointError, ConfigError, NonFiniteLossError, UnknownNameError
from secateurs.train import (
    LRScheduleConfig,
    OptimizerConfig,
    SparsifierLike,
    TrainConfig,
    Trainer,
    build_lr_schedule,
    build_optimizer,
    check_model_compatible,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

IN, CLASSES = 10, 3


class Batches:
    """In-memory batch source: reshuffles each epoch from its own generator."""

    def __init__(self, x, y, batch_size=64, seed=0, shuffle=True):
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self):
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self):
        n = len(self.x)
        order = torch.randperm(n, generator=self.gen) if self.shuffle else torch.arange(n)
        for i in range(0, n, self.batch_size):
            idx = order[i : i + self.batch_size]
            yield self.x[idx], self.y[idx]

    def state_dict(self):
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])


def make_problem(n=512, seed=0):
    """Linearly separable 3-class problem: y = argmax(x @ W)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(IN, CLASSES, generator=torch.Generator().manual_seed(123))
    x = torch.randn(n, IN, generator=g)
    return x, (x @ w).argmax(dim=1)


def make_data(seed=0, n=256, batch_size=32):
    x, y = make_problem(n, seed=1)
    return Batches(x, y, batch_size=batch_size, seed=seed)


def make_eval():
    x, y = make_problem(256, seed=2)
    return Batches(x, y, batch_size=128, shuffle=False)


def mlp(hidden=32, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, CLASSES))


def cfg(epochs=2, **kw):
    kw.setdefault("device", "cpu")
    return TrainConfig(epochs=epochs, **kw)


class FakeSparsifier:
    """Zeroes a fixed half of one weight after each optimizer step; counts calls."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.mask = torch.ones_like(weight, dtype=torch.bool)
        self.mask[:, : weight.shape[1] // 2] = False
        self.calls = 0

    def step(self):
        self.calls += 1
        with torch.no_grad():
            self.weight.mul_(self.mask)

    def state_dict(self):
        return {"calls": self.calls, "mask": self.mask.clone()}

    def load_state_dict(self, state):
        self.calls = state["calls"]
        self.mask = state["mask"].clone()


class NaNAt(nn.Module):
    """Wraps a model; its ``at``-th training forward pass returns NaN logits."""

    def __init__(self, inner, at):
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                out = out * float("nan")
        return out


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def strip_time(records):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in records]


# ----------------------------------------------------------------------- loop
def test_mlp_learns_separable_problem():
    seen = []
    trainer = Trainer(
        mlp(), make_data(), cfg(epochs=8, optimizer=OptimizerConfig(lr=0.05)),
        eval_data=make_eval(), callbacks=[seen.append], progress=False,
    )
    records = trainer.fit()
    assert len(records) == 8 and seen == records
    assert set(records[0]) == {"epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "time_s"}
    assert [r["epoch"] for r in records] == list(range(1, 9))
    assert records[-1]["step"] == 8 * 8 == trainer.state.step
    assert records[-1]["test_acc"] > 0.9
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    ev = trainer.evaluate(make_eval())
    assert ev["acc"] == records[-1]["test_acc"] and trainer.model.training


def test_same_seed_gives_bit_identical_weights():
    def run(seed, disturb):
        model = mlp(dropout=0.2)
        torch.manual_seed(disturb)  # the trainer must seed from cfg.seed, not rely on the caller
        Trainer(model, make_data(), cfg(epochs=2, seed=seed), progress=False).fit()
        return model

    assert params_equal(run(7, 1), run(7, 2))
    assert not params_equal(run(7, 1), run(8, 1))  # dropout masks depend on the seed


def test_progress_bar_runs(capsys):
    Trainer(mlp(), make_data(), cfg(epochs=1, loss_check_every=3), progress=True).fit()
    assert "train 1/1" in capsys.readouterr().err


# ----------------------------------------------------------------- optimizers
def test_build_optimizer_hyperparameters():
    model = mlp()
    sgd = build_optimizer(model, OptimizerConfig(lr=0.3, momentum=0.8, nesterov=True, weight_decay=5e-4))
    assert type(sgd) is torch.optim.SGD
    g = sgd.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"], g["foreach"]) == (0.3, 0.8, True, 5e-4, True)
    assert len(g["params"]) == 4

    adam = build_optimizer(model.parameters(), OptimizerConfig(name="adam", lr=1e-3, betas=(0.8, 0.99), weight_decay=1e-4))
    assert type(adam) is torch.optim.Adam
    g = adam.param_groups[0]
    assert (g["lr"], g["betas"], g["weight_decay"], g["foreach"]) == (1e-3, (0.8, 0.99), 1e-4, True)

    adamw = build_optimizer(model, OptimizerConfig(name="adamw", lr=2e-3, weight_decay=0.05))
    assert type(adamw) is torch.optim.AdamW
    g = adamw.param_groups[0]
    assert (g["lr"], g["betas"], g["weight_decay"]) == (2e-3, (0.9, 0.999), 0.05)


def test_build_optimizer_skips_frozen_params():
    model = mlp()
    model[0].weight.requires_grad_(False)
    assert len(build_optimizer(model, OptimizerConfig()).param_groups[0]["params"]) == 3


# ---------------------------------------------------------------- LR schedule
def lrs(schedule_cfg, steps_per_epoch=10, epochs=10, lr=1.0):
    """lr used by optimizer step 0, 1, ..., epochs*steps_per_epoch (one past the end)."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = build_lr_schedule(opt, schedule_cfg, steps_per_epoch, epochs)
    out = []
    for _ in range(epochs * steps_per_epoch + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_lr_warmup_ramp():
    v = lrs(LRScheduleConfig(warmup_epochs=1.0))
    assert v[0] == pytest.approx(0.1) and v[4] == pytest.approx(0.5) and v[9] == pytest.approx(1.0)
    assert v[10] == v[50] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(v[:9], v[1:10]))


def test_lr_multistep_drops_at_milestone_steps():
    v = lrs(LRScheduleConfig(name="multistep", milestones=(3, 6), gamma=0.1))
    assert v[29] == pytest.approx(1.0) and v[30] == pytest.approx(0.1)
    assert v[59] == pytest.approx(0.1) and v[60] == pytest.approx(0.01) and v[99] == pytest.approx(0.01)


def test_lr_cosine_with_warmup_ends_at_min_lr():
    v = lrs(LRScheduleConfig(name="cosine", warmup_epochs=2, min_lr=0.01))
    assert v[19] == pytest.approx(1.0)  # warm-up done, cosine starts at its top
    assert v[20 + 40] == pytest.approx(0.01 + 0.99 * 0.5)  # half way through the 80 cosine steps
    assert v[100] == pytest.approx(0.01) and v[99] > 0.01
    assert all(a >= b for a, b in zip(v[19:], v[20:]))


# ---------------------------------------------------------------- checkpoints
def test_save_load_roundtrip_and_format_tag(tmp_path):
    path = tmp_path / "sub" / "ck.pt"
    save_checkpoint(path, {"a": torch.arange(3), "b": "x"})
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["a"], torch.arange(3)) and loaded["b"] == "x"
    assert loaded["format"] == "secateurs.train.checkpoint"
    assert os.listdir(path.parent) == ["ck.pt"]


@pytest.mark.parametrize("fail_in", ["replace", "save"])
def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch, fail_in):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"version": 1, "w": torch.ones(100)})
    before = path.read_bytes()
    real_save = torch.save

    def half_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.truncate(f.tell() // 2)
        raise OSError("disk full (simulated)")

    def boom(*a, **k):
        raise OSError("crash (simulated)")

    if fail_in == "save":
        monkeypatch.setattr(torch, "save", half_save)
    else:
        monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(CheckpointError, match="simulated"):
        save_checkpoint(path, {"version": 2, "w": torch.zeros(100)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["version"] == 1
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temp file left behind


def test_truncated_checkpoint_raises_checkpoint_error(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"w": torch.randn(1000)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "delete" in str(err.value)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path)


def test_foreign_file_and_missing_file_raise(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="not a secateurs"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "nope.pt")


def test_checkpoint_from_other_model_leaves_weights_unchanged(tmp_path):
    path = tmp_path / "ck.pt"
    Trainer(mlp(hidden=32), make_data(), cfg(epochs=1), checkpoint_path=path, progress=False).fit()
    other = mlp(hidden=16, seed=5)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    trainer = Trainer(other, make_data(), cfg(epochs=2), checkpoint_path=path, progress=False)
    with pytest.raises(CheckpointError, match="different model") as err:
        trainer.resume()
    assert "0.weight" in str(err.value) and "(32, 10)" in str(err.value) and "(16, 10)" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    assert trainer.state.epoch == 0 and trainer.state.step == 0 and not trainer.optimizer.state


def test_check_model_compatible_lists_keys():
    model = mlp()
    sd = dict(model.state_dict())
    check_model_compatible(model, sd, "x.pt")  # same model: fine
    sd.pop("3.bias")
    sd["extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        check_model_compatible(model, sd, "x.pt")
    msg = str(err.value)
    assert "missing keys ['3.bias']" in msg and "unexpected keys ['extra']" in msg and "x.pt" in msg


def test_rng_state_roundtrip():
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])


# -------------------------------------------------------------- non-finite loss
@pytest.mark.parametrize("nan_at,check_every,epoch", [(19, 5, 3), (19, 1, 3), (16, 100, 2), (5, 4, 1)])
def test_nan_loss_names_step_and_keeps_last_good_checkpoint(tmp_path, nan_at, check_every, epoch):
    path = tmp_path / "ck.pt"
    model = NaNAt(mlp(), at=nan_at)  # 8 steps per epoch
    trainer = Trainer(model, make_data(), cfg(epochs=4, loss_check_every=check_every), checkpoint_path=path, progress=False)
    with pytest.raises(NonFiniteLossError) as err:
        trainer.fit()
    msg = str(err.value)
    assert f"global step {nan_at} (epoch {epoch}," in msg
    assert "lower the learning rate" in msg.lower() and "grad_clip" in msg
    if epoch > 1:
        assert str(path) in msg and "not overwritten" in msg
        state = load_checkpoint(path)
        assert state["train_state"] == {"epoch": epoch - 1, "step": 8 * (epoch - 1)}
        assert all(torch.isfinite(v).all() for v in state["model"].values())
    else:
        assert not path.exists() and "no checkpoint had been written" in msg


def test_huge_lr_raises_non_finite():
    trainer = Trainer(mlp(), make_data(), cfg(epochs=3, optimizer=OptimizerConfig(lr=1e30)), progress=False)
    with pytest.raises(NonFiniteLossError, match="global step"):
        trainer.fit()


# ----------------------------------------------------------------------- resume
def resume_cfg(epochs):
    return cfg(
        epochs=epochs, seed=3, grad_clip=1.0, label_smoothing=0.1, loss_check_every=3,
        optimizer=OptimizerConfig(lr=0.05, nesterov=True, weight_decay=1e-4),
        lr_schedule=LRScheduleConfig(name="multistep", milestones=(2, 3), gamma=0.5, warmup_epochs=1.5),
    )


def test_resume_is_bit_identical(tmp_path):
    full_model = mlp(dropout=0.3)
    full = Trainer(full_model, make_data(), resume_cfg(4), eval_data=make_eval(), checkpoint_path=tmp_path / "a.pt", progress=False)
    full_records = full.fit()

    first = Trainer(mlp(dropout=0.3), make_data(), resume_cfg(1), eval_data=make_eval(), checkpoint_path=tmp_path / "b.pt", progress=False)
    first.fit()
    torch.manual_seed(999)  # disturb the global RNG: resume must restore it
    random.seed(1)
    resumed_model = mlp(seed=42, dropout=0.3)  # different init: must be overwritten
    resumed = Trainer(
        resumed_model, make_data(seed=77), resume_cfg(4), eval_data=make_eval(),
        checkpoint_path=tmp_path / "b.pt", progress=False,
    )
    assert resumed.resume() and resumed.state.epoch == 1 and resumed.state.step == 8
    resumed_records = resumed.fit()

    assert params_equal(full_model, resumed_model)
    sa, sb = full.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        assert all(torch.equal(sa["state"][k][n], sb["state"][k][n]) for n in sa["state"][k])
    assert strip_time(full_records) == strip_time(resumed_records)
    assert full.lr_schedule.state_dict() == resumed.lr_schedule.state_dict()


def test_resume_without_checkpoint_returns_false(tmp_path):
    trainer = Trainer(mlp(), make_data(), cfg(), checkpoint_path=tmp_path / "none.pt", progress=False)
    assert trainer.resume() is False and trainer.state.epoch == 0
    assert Trainer(mlp(), make_data(), cfg(), progress=False).resume() is False


# -------------------------------------------------------------------- sparsifier
def test_sparsifier_called_once_per_step_and_roundtrips(tmp_path):
    path = tmp_path / "ck.pt"
    model = mlp()
    sparsifier = FakeSparsifier(model[0].weight)
    assert isinstance(sparsifier, SparsifierLike)
    trainer = Trainer(model, make_data(), cfg(epochs=2), sparsifier=sparsifier, checkpoint_path=path, progress=False)
    trainer.fit()
    assert sparsifier.calls == trainer.state.step == 16
    # called after optimizer.step: momentum would otherwise revive the masked half
    assert torch.count_nonzero(model[0].weight[:, :5]) == 0 and torch.count_nonzero(model[0].weight[:, 5:]) > 0

    model2 = mlp(seed=9)
    fresh = FakeSparsifier(model2[0].weight)
    fresh.mask.fill_(True)
    trainer2 = Trainer(model2, make_data(), cfg(epochs=3), sparsifier=fresh, checkpoint_path=path, progress=False)
    assert trainer2.resume()
    assert fresh.calls == 16 and torch.equal(fresh.mask, sparsifier.mask)
    trainer2.fit()
    assert fresh.calls == 24 == trainer2.state.step

    plain = Trainer(mlp(), make_data(), cfg(epochs=3), checkpoint_path=path, progress=False)
    with pytest.raises(CheckpointError, match="sparsifier"):
        plain.resume()


# ------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: OptimizerConfig(lr=0), "lr"),
        (lambda: OptimizerConfig(lr=-1.0), "lr"),
        (lambda: OptimizerConfig(lr=float("nan")), "lr"),
        (lambda: OptimizerConfig(momentum=1.0), "momentum"),
        (lambda: OptimizerConfig(momentum=0.0, nesterov=True), "nesterov"),
        (lambda: OptimizerConfig(weight_decay=-0.1), "weight_decay"),
        (lambda: OptimizerConfig(betas=(0.9, 1.5)), "betas"),
        (lambda: LRScheduleConfig(name="multistep", milestones=(5, 3)), "increasing"),
        (lambda: LRScheduleConfig(name="multistep"), "milestones"),
        (lambda: LRScheduleConfig(milestones=(0,)), "milestones"),
        (lambda: LRScheduleConfig(gamma=0), "gamma"),
        (lambda: LRScheduleConfig(warmup_epochs=-1), "warmup"),
        (lambda: LRScheduleConfig(min_lr=-1), "min_lr"),
        (lambda: TrainConfig(epochs=-1), "epochs"),
        (lambda: TrainConfig(epochs=1.5), "epochs"),
        (lambda: TrainConfig(epochs=1, device="tpu9"), "device"),
        (lambda: TrainConfig(epochs=1, grad_clip=0), "grad_clip"),
        (lambda: TrainConfig(epochs=1, loss_check_every=0), "loss_check_every"),
        (lambda: TrainConfig(epochs=1, label_smoothing=1.0), "label_smoothing"),
        (lambda: TrainConfig(epochs=1, lr_schedule=LRScheduleConfig(min_lr=0.5)), "min_lr"),
        (lambda: TrainConfig(epochs=1, optimizer={"lr": 0.1, "lrr": 1}), "lrr"),
    ],
)
def test_bad_config_raises(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_unknown_names_list_known_ones():
    with pytest.raises(UnknownNameError, match="adam, adamw, sgd"):
        OptimizerConfig(name="sgdd")
    with pytest.raises(UnknownNameError, match="constant, cosine, linear, multistep"):
        LRScheduleConfig(name="cos")


def test_config_accepts_mappings_and_lists():
    c = TrainConfig(epochs=1, optimizer={"name": "adam", "betas": [0.8, 0.9]}, lr_schedule={"name": "multistep", "milestones": [1, 2]})
    assert c.optimizer.betas == (0.8, 0.9) and c.lr_schedule.milestones == (1, 2)
    with pytest.raises(Exception):
        c.optimizer.lr = 1.0  # frozen


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only host")
def test_cuda_request_without_cuda_is_config_error():
    with pytest.raises(ConfigError, match="CUDA is not available"):
        Trainer(mlp(), make_data(), TrainConfig(epochs=1, device="cuda"), progress=False)


def test_bad_train_data_and_sparsifier_are_config_errors():
    with pytest.raises(ConfigError, match="train_data"):
        Trainer(mlp(), [(torch.zeros(2, IN), torch.zeros(2, dtype=torch.long))], cfg(), progress=False)
    with pytest.raises(ConfigError, match="sparsifier"):
        Trainer(mlp(), make_data(), cfg(), sparsifier=object(), progress=False)


# -- mid-epoch evaluation, starting mid-schedule, step callbacks -----------------------------
def test_eval_every_records_val_and_test_at_those_steps_and_survives_resume(tmp_path):
    path = tmp_path / "ck.pt"
    trainer = Trainer(mlp(), make_data(), cfg(epochs=2, eval_every=3), eval_data=make_eval(),
                      val_data=make_eval(), checkpoint_path=path, progress=False)
    trainer.fit()
    steps = [r["step"] for r in trainer.evaluations]
    assert steps == list(range(3, 16 + 1, 3))  # 8 steps per epoch, 2 epochs
    assert set(trainer.evaluations[0]) == {"step", "val_loss", "val_acc", "test_loss", "test_acc"}
    assert "val_loss" in trainer.history[-1]
    again = Trainer(mlp(), make_data(), cfg(epochs=2, eval_every=3), eval_data=make_eval(),
                    val_data=make_eval(), checkpoint_path=path, progress=False)
    assert again.resume()
    assert again.evaluations == trainer.evaluations


def test_start_step_sets_the_schedule_position_and_trains_only_the_remaining_steps():
    schedule = {"name": "multistep", "milestones": (1,), "gamma": 0.1}
    seen: list[tuple[int, float]] = []
    trainer = Trainer(mlp(), make_data(), cfg(epochs=2, lr_schedule=schedule, optimizer={"lr": 0.5}),
                      step_callbacks=[lambda t: seen.append((t.state.step, t.optimizer.param_groups[0]["lr"]))],
                      start_step=5, progress=False)
    assert trainer.optimizer.param_groups[0]["lr"] == 0.5  # step 5 < milestone at step 8
    trainer.fit()
    assert [s for s, _ in seen] == list(range(6, 17))  # 11 steps: 3 left of epoch 1, then 8
    assert seen[2][1] == pytest.approx(0.05)  # after step 8 the milestone applied
    late = Trainer(mlp(), make_data(), cfg(epochs=2, lr_schedule=schedule, optimizer={"lr": 0.5}),
                   start_step=9, progress=False)
    assert late.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_start_step_beyond_the_run_is_a_clear_error():
    with pytest.raises(ConfigError, match="outside the training run of 16 steps"):
        Trainer(mlp(), make_data(), cfg(epochs=2), start_step=17, progress=False)


def test_linear_schedule_decays_to_min_lr():
    from secateurs.train.optim import build_lr_schedule

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = build_lr_schedule(opt, LRScheduleConfig(name="linear", min_lr=0.1), steps_per_epoch=5, epochs=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1.0)
    assert lrs[5] == pytest.approx(0.55)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
