"""Selective network linearization: the masked ReLU, exact budgets, and the experiment's
resumable search / binarize / fine-tune stages."""
import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

from secateurs.data import load_dataset
from secateurs.errors import CheckpointError, ConfigError
from secateurs.experiments.linearize import (
    aggregate, format_aggregate, load_linearize_config, run_linearize,
)
from secateurs.experiments.runs import RunDir
from secateurs.linearize import (
    LassoSchedule, MaskedReLU, alpha_parameters, binarize, clamp_alphas_, lasso_penalty, linearizable, relu_count,
)


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(3 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 2),
    )


X = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))


def set_alphas(model, value):
    with torch.no_grad():
        for a in alpha_parameters(model):
            a.fill_(value)


def test_linearizable_keeps_the_function_and_counts_positions():
    model = tiny()
    expected = model(X)
    positions = linearizable(model, X)
    assert positions == {"1": 3 * 4 * 4, "4": 5}
    assert isinstance(model[1], MaskedReLU) and isinstance(model[4], MaskedReLU)
    assert torch.equal(model(X), expected)  # alpha = 1 is exactly the ReLU (the inplace one included)
    assert relu_count(model) == (53, {"1": 48, "4": 5})


def test_soft_mode_interpolates_exactly():
    relu = MaskedReLU((7,))
    x = torch.randn(5, 7)
    assert torch.equal(relu(x), torch.relu(x))
    set_alphas(relu, 0.0)
    assert torch.equal(relu(x), x)
    set_alphas(relu, 0.25)
    assert torch.allclose(relu(x), 0.25 * torch.relu(x) + 0.75 * x)
    model, reference = tiny(), tiny()
    linearizable(model, X)
    set_alphas(model, 0.0)
    linear = nn.Sequential(*[m for m in reference if not isinstance(m, nn.ReLU)])
    assert torch.equal(model(X), linear(X))


def test_hard_mode_follows_the_mask_and_freezes_alpha():
    model = tiny()
    linearizable(model, X)
    with torch.no_grad():
        model[1].alpha.copy_(torch.rand(model[1].alpha.shape, generator=torch.Generator().manual_seed(2)))
    layers = binarize(model, 20)
    assert sum(layers.values()) == 20 and layers == relu_count(model)[1]
    relu = model[1]
    assert relu.mode == "hard" and not relu.alpha.requires_grad and alpha_parameters(model) == []
    x = torch.randn(3, *relu.keep.shape)
    assert torch.equal(relu(x), torch.where(relu.keep, torch.relu(x), x))
    # the mode and the mask travel with the state dict
    fresh = tiny()
    linearizable(fresh, X)
    fresh.load_state_dict(model.state_dict())
    assert fresh[1].mode == "hard" and torch.equal(fresh[1].keep, relu.keep) and torch.equal(fresh(X), model(X))


def test_binarize_keeps_exactly_the_budget_with_ties_broken_by_position():
    model = tiny()
    linearizable(model, X)
    with torch.no_grad():
        model[1].alpha.fill_(0.5)  # 48 ties
        model[1].alpha.view(-1)[[3, 40]] = 0.9
        model[4].alpha.fill_(0.5)  # 5 more ties, after the first module's
        model[4].alpha[2] = 1.0
    layers = binarize(model, 10)
    assert layers == {"1": 9, "4": 1}
    keep = model[1].keep.view(-1)
    assert keep[[3, 40]].all() and keep[:9].sum() == 8 and not keep[9:40].any()  # lowest-index ties first
    assert model[4].keep.tolist() == [False, False, True, False, False]
    for budget in (0, 53):
        m = tiny()
        linearizable(m, X)
        set_alphas(m, 0.0)
        assert sum(binarize(m, budget).values()) == budget == relu_count(m)[0]


@pytest.mark.parametrize("budget, match", [(-1, r"outside \[0, 53\]"), (54, r"outside \[0, 53\]"),
                                           (0.5, "must be an int"), (True, "must be an int")])
def test_bad_budgets_are_refused(budget, match):
    model = tiny()
    linearizable(model, X)
    with pytest.raises(ConfigError, match=match):
        binarize(model, budget)
    assert model[1].mode == "soft"  # nothing changed


def test_models_that_cannot_be_masked_are_refused():
    functional = nn.Sequential(nn.Flatten(), nn.Linear(36, 2))
    with pytest.raises(ConfigError, match="no nn.ReLU modules; a functional relu .* cannot be masked: use nn.ReLU modules"):
        linearizable(functional, X)

    class Shared(nn.Module):  # one ReLU module applied twice (like a residual block's self.relu)
        def __init__(self):
            super().__init__()
            self.a, self.b, self.relu = nn.Linear(36, 4), nn.Linear(4, 4), nn.ReLU()

        def forward(self, x):
            return self.relu(self.b(self.relu(self.a(x.flatten(1)))))

    shared = Shared()
    with pytest.raises(ConfigError, match="'relu' ran 2 times"):
        linearizable(shared, X)
    assert type(shared.relu) is nn.ReLU  # refused before anything was swapped
    model = tiny()
    linearizable(model, X)
    with pytest.raises(ConfigError, match="already linearizable"):
        linearizable(model, X)
    with pytest.raises(ConfigError, match="call linearizable"):
        relu_count(tiny())


def test_lasso_penalty_and_clamp():
    model = tiny()
    linearizable(model, X)
    assert float(lasso_penalty(model).detach()) == 53.0
    with torch.no_grad():
        model[1].alpha.fill_(-0.5)
        model[4].alpha.fill_(2.0)
    clamp_alphas_(model)
    assert float(lasso_penalty(model).detach()) == 5.0
    assert relu_count(model, threshold=0.01) == (5, {"1": 0, "4": 5})
    lasso_penalty(model).backward()
    assert torch.equal(model[4].alpha.grad, torch.ones(5))


def test_lasso_schedule_grows_lambda_only_when_the_count_stalls():
    schedule = LassoSchedule(budget=10, lasso=1.0, growth=2.0, min_decrease=0.1)
    assert not schedule.update(100) and schedule.lasso == 1.0  # first check: nothing to compare
    assert not schedule.update(50) and schedule.lasso == 1.0  # fell by half
    assert not schedule.update(48) and schedule.lasso == 2.0  # fell by 4% < 10%
    copy_ = LassoSchedule(budget=10, lasso=1.0)
    copy_.load_state_dict(schedule.state_dict())
    assert copy_ == schedule
    assert schedule.update(10) and schedule.checks == 4
    with pytest.raises(ConfigError, match="growth must be a number >= 1"):
        LassoSchedule(budget=1, lasso=1.0, growth=0.5)
    with pytest.raises(CheckpointError, match="needs keys"):
        copy_.load_state_dict({"lasso": 1.0})


# -- the experiment on sklearn's digits (Conv-2: 2 * 64*8*8 + 256 + 256 = 8704 ReLUs) -------------
BASE = {
    "name": "lz",
    "data": {"dataset": "digits", "batch_size": 64, "eval_batch_size": 512},
    "model": {"name": "conv2"},
    "train": {"epochs": 1, "optimizer": {"name": "adam", "lr": 2e-3}},
    "snl": {"budgets": [0.5, 0.1], "epochs": 2, "check_every": 2, "lasso": 1e-3, "lasso_growth": 1.5,
            "alpha_lr": 0.1, "optimizer": {"name": "adam", "lr": 5e-4}},
    "finetune": {"epochs": 2, "optimizer": {"name": "adam", "lr": 5e-4}},
}


@pytest.fixture(scope="module")
def digits():
    full = load_dataset("digits")  # 384 of the 1437 training images keep the runs short
    return dataclasses.replace(full, train_images=full.train_images[:384], train_labels=full.train_labels[:384])


def linearize(root, digits, data=None, echo=lambda s: None):
    config = load_linearize_config(None, copy.deepcopy(data or BASE))
    run = RunDir.for_config(config, root)
    return config, run, run_linearize(config, run, progress=False, echo=echo, dataset=digits)


@pytest.fixture(scope="module")
def clean(tmp_path_factory, digits):
    return linearize(tmp_path_factory.mktemp("clean"), digits)


def test_budgets_are_met_exactly_and_reported(clean):
    _, run, results = clean
    assert results["complete"] and [r["phase"] for r in results["levels"]] == ["budget-0.5", "budget-0.1"]
    dense = results["dense"]
    assert dense["relus"] == 8704 and dense["layers"] == {
        "features.1": 4096, "features.3": 4096, "classifier.2": 256, "classifier.4": 256}
    for row, budget in zip(results["levels"], (4352, 870)):
        assert row["relus_kept"] == budget == sum(row["layers"].values()) and row["relus_total"] == 8704
        assert all(0 <= row["layers"][n] <= dense["layers"][n] for n in dense["layers"])
        assert row["drop_pt"] == pytest.approx(100 * (dense["test_acc"] - row["test_acc"]))
        assert 0.0 <= row["acc_before_finetune"] <= 1.0 and row["snl"]["steps"] > 0
        mask = torch.load(run.checkpoint(f"{row['phase']}-mask"), weights_only=False)["model"]
        assert sum(int(v.sum()) for k, v in mask.items() if k.endswith(".keep")) == budget
    table = (run.path / "linearize.md").read_text()
    assert "| 100% (dense) | 8704/8704 |" in table and "| 10% | 870/8704 |" in table
    summary = aggregate([results, {**results, "seed": 1}])
    assert summary["levels"][1]["relus_kept"] == 870 and summary["levels"][1]["test_acc"]["std"] == 0.0
    assert "| 50% | 4352/8704 |" in format_aggregate(summary)


def test_an_interrupted_run_resumes_without_redoing_finished_budgets(clean, tmp_path, monkeypatch, digits):
    original_log = RunDir.log

    def interrupting_log(self, record):
        original_log(self, record)
        if record["phase"] == "budget-0.1-snl" and record["epoch"] > 1:  # the second budget, search epoch 2
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "log", interrupting_log)
    with pytest.raises(KeyboardInterrupt):
        linearize(tmp_path, digits)
    monkeypatch.setattr(RunDir, "log", original_log)
    interrupted = RunDir.for_config(load_linearize_config(None, BASE), tmp_path).results()
    assert not interrupted["complete"] and [r["phase"] for r in interrupted["levels"]] == ["budget-0.5"]
    said = []
    _, run, resumed = linearize(tmp_path, digits, echo=said.append)
    assert "resumed budget-0.1-snl at epoch 1/2" in said
    records = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    finished = [(r["phase"], r.get("epoch")) for r in records if r["phase"].startswith(("dense", "budget-0.5"))]
    assert len(finished) == len(set(finished))  # the dense network and the first budget were not redone
    for a, b in zip(clean[2]["levels"], resumed["levels"], strict=True):
        for key in ("relus_kept", "layers", "snl", "acc_before_finetune", "test_acc", "test_loss"):
            assert a[key] == b[key], key


def test_a_changed_config_is_refused_and_a_finished_run_is_reused(clean, digits):
    config, run, results = clean
    changed = load_linearize_config(None, {**copy.deepcopy(BASE), "snl": {**BASE["snl"], "lasso": 1e-2}})
    with pytest.raises(ConfigError, match="different config.*snl.lasso"):
        run_linearize(changed, run, progress=False, echo=lambda s: None, dataset=digits)
    said = []
    assert run_linearize(config, run, progress=False, echo=said.append, dataset=digits) == results
    assert said == [f"reusing finished run {run.path}"]


@pytest.mark.parametrize("snl, match", [
    ({"budgets": [0.5, 1.0]}, r"in \(0, 1\)"), ({"budgets": [0.5, 0.5]}, "without repeats"),
    ({"epochs": 0}, "snl.epochs must be an integer >= 1"), ({"lasso_growth": 0.9}, "lasso_growth must be >= 1"),
    ({"threshold": 1.0}, r"threshold must be in \[0, 1\)"), ({"lam": 1.0}, "known keys under snl"),
])
def test_bad_settings_are_refused(snl, match):
    with pytest.raises(ConfigError, match=match):
        load_linearize_config(None, {"snl": snl})


def test_the_zoo_resnets_are_linearizable_with_one_mask_per_activation():
    from secateurs.linearize import binarize, linearizable, relu_count
    from secateurs.models import create_model

    model = create_model("resnet20", in_channels=3, image_size=32)
    x = torch.randn(2, 3, 32, 32)
    before = model.eval()(x)
    counts = linearizable(model, x)
    # stem 16x32x32, then 3 blocks x 2 ReLUs per stage at 16x32x32, 32x16x16, 64x8x8
    assert sum(counts.values()) == 16 * 32 * 32 + 6 * (16 * 32 * 32 + 32 * 16 * 16 + 64 * 8 * 8) == 188416
    assert torch.equal(model(x), before)  # all alphas 1: still the same network
    assert binarize(model, 1000) and relu_count(model)[0] == 1000


def snl_records(run, phase):
    """The search's check records of ``phase`` by step; a step logged twice (before an
    interruption and again after resuming) keeps its last record."""
    records = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    return {r["step"]: r for r in records if r["phase"] == phase}


def test_an_interrupted_search_resumes_bit_identically(tmp_path, monkeypatch, digits):
    # min_decrease 0.5: lambda grows at the checks (the lasso schedule's state must survive too)
    data = copy.deepcopy(BASE)
    data["snl"].update(budgets=[0.5], min_decrease=0.5)
    _, clean_run, _ = linearize(tmp_path / "clean", digits, data)
    saved = torch.load(clean_run.checkpoint("budget-0.5-snl"), weights_only=False)
    assert saved["stopped"] and saved["train_state"]["step"] < 12  # the budget was met before the last step
    assert saved["extra_state"]["lasso"]["lasso"] > BASE["snl"]["lasso"]
    original_log = RunDir.log

    def interrupting_log(self, record):
        original_log(self, record)
        if record["phase"] == "budget-0.5-snl" and record["step"] == 8:  # search epoch 2
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "log", interrupting_log)
    with pytest.raises(KeyboardInterrupt):
        linearize(tmp_path / "cut", digits, data)
    monkeypatch.setattr(RunDir, "log", original_log)
    said = []
    _, run, _ = linearize(tmp_path / "cut", digits, data, echo=said.append)
    assert "resumed budget-0.5-snl at epoch 1/2" in said
    assert snl_records(run, "budget-0.5-snl") == snl_records(clean_run, "budget-0.5-snl")
    resumed = torch.load(run.checkpoint("budget-0.5-snl"), weights_only=False)
    assert resumed["extra_state"] == saved["extra_state"] and resumed["train_state"] == saved["train_state"]
    for name in ("budget-0.5-snl", "budget-0.5-mask", "budget-0.5-finetune"):
        a = torch.load(clean_run.checkpoint(name), weights_only=False)["model"]
        b = torch.load(run.checkpoint(name), weights_only=False)["model"]
        assert a.keys() == b.keys() and all(
            torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
        ), name


def test_a_search_checkpoint_of_the_old_loop_is_refused_with_the_fix(tmp_path, monkeypatch, digits):
    from secateurs.errors import CheckpointError
    from secateurs.train import save_checkpoint

    original_log = RunDir.log

    def interrupting_log(self, record):
        original_log(self, record)
        if record["phase"] == "budget-0.5-snl":
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "log", interrupting_log)
    with pytest.raises(KeyboardInterrupt):
        linearize(tmp_path, digits)
    monkeypatch.setattr(RunDir, "log", original_log)
    run = RunDir.for_config(load_linearize_config(None, BASE), tmp_path)
    save_checkpoint(run.checkpoint("budget-0.5-snl"), {"model": {}, "search": {"epoch": 1, "step": 6}})
    with pytest.raises(CheckpointError, match="budget-0.5-snl.pt is an SNL search checkpoint written by an older "
                                              "secateurs; delete it to redo budget-0.5-snl"):
        linearize(tmp_path, digits)


def test_a_diverging_search_names_the_snl_settings(tmp_path, digits):
    from secateurs.errors import NonFiniteLossError

    data = copy.deepcopy(BASE)
    data["snl"]["optimizer"] = {"name": "sgd", "lr": 1e30}
    with pytest.raises(NonFiniteLossError, match=r"budget-0.5-snl: loss became .* snl.optimizer.lr \(1e\+30\).*"
                                                 r"snl.alpha_lr \(0.1\) and snl.lasso \(0.001\)\. Lower them"):
        linearize(tmp_path, digits, data)
