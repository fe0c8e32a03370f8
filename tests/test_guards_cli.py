"""Never silently wrong, at the command line: every bad input is one line and exit 2, runs that
learn nothing fail, a divergence says the command that goes on, and no command overwrites
another's results (issue 20)."""
import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from secateurs.cli import main
from secateurs.errors import ConfigError, TrainingHealthError
from secateurs.experiments import RunDir, load_config
from secateurs.experiments.config import read_yaml
from secateurs.train import Trainer, TrainConfig, load_checkpoint

TINY = {
    "name": "tiny",
    "data": {"dataset": "digits", "batch_size": 64, "eval_batch_size": 512},
    "model": {"name": "lenet300_100"},
    "train": {"epochs": 2, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
    "prune": {"sparsities": [0.5]},
    "finetune": {"epochs": 1, "optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9}},
}


def write(tmp_path, data=TINY, name="cfg.yaml", text=None):
    path = tmp_path / name
    path.write_text(text if text is not None else yaml.safe_dump(data))
    return path


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *fragments):
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("secateurs: error: "), f"one line, no traceback: {err}"
    for fragment in fragments:
        assert fragment in err, (fragment, err)


# -------------------------------------------------------------- configs that cannot do what they say
@pytest.mark.parametrize("text,fragments", [
    ("", ["is empty"]),
    ("# only a comment\n", ["is empty"]),
    ("train:\n  epochs: 1\ntrain:\n  epochs: 2\n", ["key 'train' appears twice", "lines 1 and 3"]),
    ("prune:\n  sparsities: [0.5]\n  sparsities: [0.9]\n", ["key 'sparsities' appears twice"]),
    ("train: [1, 2\n", ["not valid YAML"]),
    ("- a\n- b\n", ["must hold a mapping"]),
])
def test_bad_config_files(tmp_path, capsys, text, fragments):
    code, _, err = run_cli(capsys, "train", "--config", write(tmp_path, text=text), "--runs-dir", tmp_path / "r")
    one_line_error(code, err, *fragments)
    assert not (tmp_path / "r").exists(), "nothing is created for a refused config"


def test_yaml_merge_keys_still_work(tmp_path):
    path = write(tmp_path, text="base: &b {epochs: 1}\ntrain:\n  <<: *b\n  epochs: 3\n")
    assert read_yaml(path)["train"] == {"epochs": 3}


@pytest.mark.parametrize("flags,fragments", [
    (["--epochs", "0"], ["train.epochs is 0", "--epochs"]),
    (["--set", "prune.sparsities=[]"], ["prune.sparsities is empty", "--sparsity 0.9"]),
    (["--set", "train.lr_schedule.warmup_epochs=3"], ["train: lr_schedule.warmup_epochs (3)", "longer than the 2 epoch"]),
    (["--set", "train.lr_schedule.name=multistep", "--set", "train.lr_schedule.milestones=[1, 2]"],
     ["lr_schedule.milestones [2] are at or past the end of training", "milestones=[1]"]),
    (["--set", "finetune.lr_schedule.warmup_epochs=2"], ["finetune: lr_schedule.warmup_epochs"]),
    (["--device", "tpu"], ["device 'tpu' is not a device"]),
    (["--set", "device=tpu"], ["device 'tpu' is not a device"]),
    (["--set", "prune.sparsities=[0.5,"], ["--set prune.sparsities=[0.5,", "not valid YAML"]),
    (["--set", "train.epochs"], ["--set expects KEY=VALUE"]),
    (["--set", "=3"], ["the key is empty"]),
    (["--set", "train..epochs=3"], ["empty part"]),
    (["--set", "train.epochs=3", "--set", "train.epochs=4"], ["given twice"]),
    (["--set", "train.health=maybe"], ["unknown health 'maybe'"]),
    (["--method", "rigl", "--set", "prune.params.end=100000"], ["past the end of training"]),
])
def test_bad_train_flags(tmp_path, capsys, flags, fragments):
    code, _, err = run_cli(capsys, "train", "--config", write(tmp_path), "--runs-dir", tmp_path / "r", "--no-progress", *flags)
    one_line_error(code, err, *fragments)
    assert not list((tmp_path / "r").glob("*/checkpoints/*.pt")), "nothing was trained"


def test_a_schedule_point_past_the_end_fails_before_the_dense_training(tmp_path, capsys):
    """The method's settings are checked before hours of dense training are spent."""
    code, _, err = run_cli(capsys, "train", "--config", write(tmp_path), "--runs-dir", tmp_path / "r", "--no-progress",
                           "--method", "gmp", "--set", "prune.params.end=100000")
    one_line_error(code, err, "GMP end=100000")
    assert not list((tmp_path / "r").glob("*/checkpoints/dense.pt"))


def test_runs_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(capsys, "train", "--config", write(tmp_path), "--runs-dir", tmp_path / "afile", "--no-progress")
    one_line_error(code, err, "is a file, not a directory")
    code, _, err = run_cli(capsys, "train", "--config", write(tmp_path), "--runs-dir", tmp_path / "afile" / "sub", "--no-progress")
    one_line_error(code, err, "is a file, not a directory")


def test_config_of_another_command_names_the_command(tmp_path, capsys):
    compare = write(tmp_path, text="name: c\nbase: {}\nvariants: [{label: a, method: snip}]\n", name="c.yaml")
    code, _, err = run_cli(capsys, "train", "--config", compare, "--runs-dir", tmp_path / "r")
    one_line_error(code, err, "looks like a `secateurs compare` config", f"secateurs compare --config {compare}")


def test_unreadable_paths_are_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "report", tmp_path / "nowhere")
    one_line_error(code, err, "is not a directory")
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    code, _, err = run_cli(capsys, "train", "--config", binary, "--runs-dir", tmp_path / "r")
    one_line_error(code, err)


# ------------------------------------------------------------------------- the training-health guard
class _Prior(nn.Module):
    """Ignores its input: the best it can learn is the class frequencies (loss = their entropy)."""

    def __init__(self, classes=4):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(classes))

    def forward(self, x):
        return self.bias.expand(x.shape[0], -1)


class _Batches:
    def __init__(self, n, batch=8, classes=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, batch, 3, generator=g)
        self.y = torch.randint(0, classes, (n, batch), generator=g)

    def __iter__(self):
        return iter(zip(self.x, self.y))

    def __len__(self):
        return len(self.x)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _trainer(model, steps, health="error", **kw):
    cfg = TrainConfig(epochs=2, device="cpu", health=health, optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.0})
    return Trainer(model, _Batches(steps), cfg, progress=False, **kw)


def test_a_model_that_learns_only_the_prior_fails_after_its_first_epoch():
    trainer = _trainer(_Prior(), steps=40)
    with pytest.raises(TrainingHealthError, match=r"after epoch 1 the training loss is .* not below chance") as e:
        trainer.fit()
    assert "optimizer.lr=0.1; try 0.01" in str(e.value) and "health: mark" in str(e.value)
    assert trainer.state.epoch == 1


def test_mark_records_the_verdict_and_goes_on():
    trainer = _trainer(_Prior(), steps=40, health="mark")
    history = trainer.fit()
    assert len(history) == 2 and "not below chance" in trainer.health and "not below chance" in history[0]["health"]
    assert trainer.state_dict()["health"] == trainer.health  # survives a resume
    assert _trainer(_Prior(), steps=40, health="off").fit()[0].get("health") is None


def test_a_short_run_is_judged_by_its_final_accuracy():
    """Too few steps to judge the loss: the accuracy must still beat the majority class."""
    trainer = _trainer(_Prior(), steps=6, eval_data=_Batches(3, seed=1))
    with pytest.raises(TrainingHealthError, match="no better than always predicting the most common class"):
        trainer.fit()


def test_a_model_that_learns_passes():
    torch.manual_seed(0)
    data = _Batches(40)
    data.x[..., 0] = data.y.float()  # the label is in the input: learnable
    model = nn.Linear(3, 4)
    trainer = Trainer(model, data, TrainConfig(epochs=2, device="cpu"), eval_data=data, progress=False)
    trainer.fit()
    assert trainer.health is None


def test_cli_run_that_learns_nothing_fails_with_the_cause(tmp_path, capsys):
    """A learning rate far too low on real data (digits): stopped after the first epoch of the
    dense phase, with the cause; with health: mark the run finishes and the table says FAILED."""
    flags = ["--config", write(tmp_path), "--runs-dir", tmp_path / "r", "--no-progress",
             "--batch-size", "16", "--set", "train.optimizer.lr=1e-7", "--set", "train.optimizer.momentum=0"]
    code, _, err = run_cli(capsys, "train", *flags)
    one_line_error(code, err, "dense: after epoch 1 the training loss", "not below chance")
    code, out, _ = run_cli(capsys, "train", *flags, "--set", "train.health=mark", "--set", "finetune.health=mark")
    assert code == 0 and "FAILED (learned nothing)" in out and "FAILED dense:" in out
    run = next(p for p in (tmp_path / "r").glob("tiny-*") if RunDir(p).results()["complete"])
    assert "learning nothing" in RunDir(run).results()["levels"][0]["health"]
    assert "learning nothing" in (run / "results.csv").read_text()


def test_lenet5_gets_a_learning_rate_it_can_train_at():
    config = load_config(None, {"model.name": "lenet5", "prune.sparsities": [0.9]})
    assert config.train.optimizer.lr == 0.02 and config.finetune.optimizer.lr == 0.02
    mine = load_config(None, {"model.name": "lenet5", "train.optimizer.lr": 0.05})
    assert mine.train.optimizer.lr == 0.05, "a learning rate the config sets is kept"
    assert load_config(None, {"prune.sparsities": [0.9]}).train.optimizer.lr == 0.1, "other models keep the default"


# ------------------------------------------------------------------------ recovery after a divergence
def test_after_a_divergence_the_suggested_command_goes_on_from_the_dense_phase(tmp_path, capsys):
    cfg = write(tmp_path)
    code, _, err = run_cli(capsys, "train", "--config", cfg, "--runs-dir", tmp_path / "r", "--no-progress",
                           "--set", "finetune.optimizer.lr=1e30")
    one_line_error(code, err, "sparsity-0.5: loss became", "To go on with a lower learning rate: secateurs train --resume")
    command = err.split("To go on with a lower learning rate: ")[1].split(" (")[0]
    assert command.endswith("--set finetune.optimizer.lr=1e+29")
    old = Path(command.split("--resume ")[1].split(" ")[0])
    before = (old / "checkpoints" / "dense.pt").read_bytes()
    code, out, err = run_cli(capsys, *command.split()[1:-1], "finetune.optimizer.lr=0.02", "--no-progress")
    assert code == 0, err
    assert "runs never mix" in out and "its finished dense phase is reused" in out and "complete" in out
    new = next(p for p in (tmp_path / "r").iterdir() if p != old)
    assert (new / "checkpoints" / "dense.pt").read_bytes() == before, "the dense phase was copied, not retrained"
    assert (old / "checkpoints" / "dense.pt").read_bytes() == before and not (old / "checkpoints" / "sparsity-0.5.pt").exists()
    rows = RunDir(new).results()["levels"]
    assert [r["phase"] for r in rows] == ["dense", "sparsity-0.5"]
    assert load_checkpoint(new / "checkpoints" / "sparsity-0.5.pt")["config"]["optimizer"]["lr"] == 0.02


def test_resume_with_a_change_the_dense_phase_reads_starts_a_new_run(tmp_path, capsys):
    cfg = write(tmp_path)
    assert run_cli(capsys, "train", "--config", cfg, "--runs-dir", tmp_path / "r", "--no-progress")[0] == 0
    old = next((tmp_path / "r").iterdir())
    results = (old / "results.json").read_text()
    code, out, _ = run_cli(capsys, "train", "--resume", old, "--set", "train.epochs=1", "--no-progress")
    assert code == 0 and "nothing of it is reused (the dense phase reads the changed key(s) train.epochs)" in out
    assert (old / "results.json").read_text() == results, "the old run is untouched"
    assert len(list((tmp_path / "r").iterdir())) == 2


# ------------------------------------------------------------------------------- no overwritten results
COMPARISON = {
    "name": "cmp", "seeds": [0],
    "base": {**{k: v for k, v in TINY.items() if k != "name"}, "train": {"epochs": 1}},
    "variants": [{"label": "GMP", "method": "gmp", "params": {"every": 5}}],
}


def test_compare_takes_set_and_a_changed_set_writes_its_own_table(tmp_path, capsys):
    path = write(tmp_path, COMPARISON, "cmp.yaml")
    base = ["compare", "--config", path, "--runs-dir", tmp_path / "r", "--no-progress"]
    assert run_cli(capsys, *base)[0] == 0
    code, _, err = run_cli(capsys, *base, "--set", "base.prune.sparsities=[0.8]")
    assert code == 0, err
    tables = sorted((tmp_path / "r").glob("cmp-*-comparison"))
    assert len(tables) == 2
    rows = [json.loads((t / "comparison.json").read_text())["rows"] for t in tables]
    assert sorted({r["target_sparsity"] for rs in rows for r in rs if r["method"] == "GMP"}) == [0.5, 0.8]
    code, _, err = run_cli(capsys, *base, "--set", "seeds=[]")
    one_line_error(code, err, "at least one seed")
    code, _, err = run_cli(capsys, *base, "--set", "base.train.epochs=0")
    one_line_error(code, err, "train.epochs is 0")


# ------------------------------------------------------------------ --resume with a changed config (review)
@pytest.mark.parametrize("change,fragment", [("model.name=nope", "unknown model 'nope'"),
                                             ("prune.method=nope", "unknown method 'nope'")])
def test_resume_with_a_bad_name_is_refused_before_any_directory_is_made(tmp_path, capsys, change, fragment):
    config = load_config(write(tmp_path))
    old = RunDir.for_config(config, tmp_path / "r")
    old.bind(config)
    code, out, err = run_cli(capsys, "train", "--resume", old.path, "--set", change, "--no-progress")
    one_line_error(code, err, fragment)
    assert "new run" not in out and list((tmp_path / "r").iterdir()) == [old.path], "no orphan directory"


def test_resume_with_a_change_continues_an_interrupted_dense_phase(tmp_path, capsys, monkeypatch):
    """Killed during its dense phase, a run has a per-epoch dense.pt but no dense row: a changed
    fine-tuning still starts from it, and the dense training goes on from its last epoch."""
    log = RunDir.log

    def killed_after_the_first_dense_epoch(self, record):
        log(self, record)
        if record.get("phase") == "dense" and record.get("epoch") == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "log", killed_after_the_first_dense_epoch)
    assert run_cli(capsys, "train", "--config", write(tmp_path), "--runs-dir", tmp_path / "r", "--no-progress")[0] == 130
    monkeypatch.undo()
    old = next((tmp_path / "r").iterdir())
    assert (old / "checkpoints" / "dense.pt").is_file() and not RunDir(old).results()["levels"]
    code, out, err = run_cli(capsys, "train", "--resume", old, "--set", "finetune.optimizer.lr=0.05", "--no-progress")
    assert code == 0, err
    assert "its unfinished dense phase is copied and continued" in out and "resumed dense training at epoch 1/2" in out
    new = RunDir(next(p for p in (tmp_path / "r").iterdir() if p != old))
    assert [r["phase"] for r in new.results()["levels"]] == ["dense", "sparsity-0.5"]
    assert new.results()["levels"][0]["epochs"] == 2
    assert [r["epoch"] for r in new.metrics() if r["phase"] == "dense"] == [1, 2]


def test_resume_reuses_the_dense_phase_whenever_the_new_run_trains_the_same_one(tmp_path, capsys, monkeypatch):
    """prune.dense_baseline does not matter to a method that prunes after training (it trains
    the dense network anyway), and an explicit --runs-dir runs is honoured."""
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, "train", "--config", write(tmp_path), "--runs-dir", "old", "--no-progress")[0] == 0
    old = next((tmp_path / "old").iterdir())
    code, out, err = run_cli(capsys, "train", "--resume", old, "--set", "prune.dense_baseline=false",
                             "--runs-dir", "runs", "--no-progress")
    assert code == 0, err
    assert "its finished dense phase is reused" in out and "resumed dense" not in out
    new = next((tmp_path / "runs").iterdir())
    assert (new / "checkpoints" / "dense.pt").read_bytes() == (old / "checkpoints" / "dense.pt").read_bytes()
    assert len(list((tmp_path / "old").iterdir())) == 1


def test_resume_says_why_nothing_is_reused(tmp_path, capsys):
    from secateurs.experiments.sweep import dense_reuse

    config = load_config(write(tmp_path), {"prune.method": "gmp", "prune.dense_baseline": False})
    old = RunDir.for_config(config, tmp_path / "r")
    old.bind(config)
    assert dense_reuse(old, load_config(write(tmp_path), {"prune.method": "gmp"})) == f"{old.path} has no dense checkpoint yet"
    assert dense_reuse(old, load_config(write(tmp_path), {"prune.method": "gmp", "prune.dense_baseline": False,
                                                         "prune.sparsities": [0.9]})) == (
        "the new run trains no dense phase (gmp prunes during training and prune.dense_baseline is false)")
    assert dense_reuse(old, load_config(write(tmp_path), {"seed": 3})).startswith("the dense phase reads the changed key(s) ")


# -------------------------------------------------------------------- one key, one place (review)
@pytest.mark.parametrize("flags,fragments", [
    (["--epochs", "3", "--set", "train.epochs=1"], ["train.epochs is given twice", "--epochs 3", "--set train.epochs=1"]),
    (["--set", "train.optimizer={lr: 0.3}", "--set", "train.optimizer.lr=0.2"],
     ["train.optimizer.lr is given twice, on its own and inside train.optimizer"]),
    (["--set", "train.optimizer.lr=0.2", "--set", "train.optimizer={lr: 0.3}"],
     ["train.optimizer.lr is given twice, on its own and inside train.optimizer"]),
    (["--data-root", "/x", "--set", "data.root=/y"], ["data.root is given twice"]),
    (["--data-root", "/x", "--set", "data={dataset: digits}"], ["data.root is given twice, on its own and inside data"]),
    (["--sparsity", "0.9", "--set", "prune={sparsities: [0.5]}"], ["--sparsity 0.9", "inside prune"]),
    (["--set", "train.optimizer={lr: 0.3, lr: 0.2}"], ["--set train.optimizer={lr: 0.3, lr: 0.2}: key 'lr' appears twice"]),
])
def test_a_key_given_twice_across_flags_and_set_is_refused(tmp_path, capsys, flags, fragments):
    code, _, err = run_cli(capsys, "train", "--config", write(tmp_path), "--runs-dir", tmp_path / "r", "--no-progress", *flags)
    one_line_error(code, err, *fragments)
    assert not (tmp_path / "r").exists()


def test_data_root_and_a_set_inside_it_are_refused_for_every_command(tmp_path, capsys):
    code, _, err = run_cli(capsys, "compare", "--config", write(tmp_path, COMPARISON, "cmp.yaml"), "--runs-dir",
                           tmp_path / "r", "--data-root", tmp_path, "--set", "base.data={dataset: digits}")
    one_line_error(code, err, "base.data.root is given twice, on its own and inside base.data")


# --------------------------------------------------------------------------- health verdicts (review)
def test_a_row_written_before_the_health_check_has_no_verdict_in_the_csv():
    from secateurs.analysis.report import to_csv

    row = {"phase": "dense", "target_sparsity": 0.0, "sparsity": 0.0, "test_acc": 0.9, "test_loss": 0.3}
    cells = [line.rsplit(",", 1)[1] for line in to_csv([row, {**row, "health": None}]).splitlines()[1:]]
    assert cells == ["", "ok"]


def test_health_unset_is_the_commands_default_and_a_set_one_is_kept(tmp_path, monkeypatch):
    """Indicators record an architecture that cannot learn (mark) unless the config says
    health: error; train stops (error) unless it says mark."""
    from secateurs.experiments import indicators
    from secateurs.experiments.config import PhaseConfig
    from secateurs.experiments.indicators import load_indicators_config, run_indicators

    assert PhaseConfig().train_config(seed=0, device="cpu").health == "error"
    assert PhaseConfig().train_config(seed=0, device="cpu", health="mark").health == "mark"
    assert PhaseConfig(health="error").train_config(seed=0, device="cpu", health="mark").health == "error"
    seen = []

    class Recording(indicators.Trainer):
        def __init__(self, model, data, cfg, **kwargs):
            seen.append(cfg.health)
            super().__init__(model, data, cfg, **kwargs)

    monkeypatch.setattr(indicators, "Trainer", Recording)
    base = {"device": "cpu", "data": {"dataset": "digits", "batch_size": 64, "eval_batch_size": 512},
            "indicators": {"ntk_batch": 8, "region_samples": 32, "repeats": 1},
            "train": {"epochs": 1, "optimizer": {"name": "adam", "lr": 1e-2}},
            "architectures": [{"kind": "mlp", "hidden": [8]}, {"kind": "mlp", "hidden": [16]}]}
    for overrides, expected in (({}, "mark"), ({"train.health": "error"}, "error")):
        config = load_indicators_config(None, {**base, **overrides})
        run_indicators(config, RunDir.for_config(config, tmp_path), progress=False, echo=lambda s: None)
        assert seen == [expected, expected]
        seen.clear()


def test_a_run_saved_while_health_read_as_error_still_resumes(tmp_path):
    config = load_config(write(tmp_path))
    run = RunDir.for_config(config, tmp_path / "r")
    run.bind(config)
    saved = yaml.safe_load(run.config_path.read_text())
    assert saved["train"]["health"] is None
    saved["train"]["health"] = saved["finetune"]["health"] = "error"  # as the previous version wrote it
    run.config_path.write_text(yaml.safe_dump(saved))
    assert run.changes(config) == []
    assert run.changes(load_config(write(tmp_path), {"train.health": "mark"})) == ["train.health"]
    assert RunDir.for_config(load_config(write(tmp_path), {"train.health": "error"}), tmp_path / "r").path != run.path


# ----------------------------------------------------------------- the model's defaults everywhere (review)
def test_lenet5_gets_its_learning_rate_in_every_command_that_trains_it():
    from secateurs.experiments.lottery import load_lottery_config
    from secateurs.experiments.plasticity import PlasticityConfig

    study = PlasticityConfig(name="p", prune_epochs=(1,), ratios=(0.5,), base={"model": {"name": "lenet5"}})
    assert study.experiment().train.optimizer.lr == 0.02 and study.experiment().finetune.optimizer.lr == 0.02
    lottery = load_lottery_config(None, {"model.name": "lenet5"})
    assert lottery.train.optimizer.lr == 0.02, "lottery has no finetune section, and none is made up"
    assert load_lottery_config(None, {"model.name": "lenet5", "train.optimizer.lr": 0.3}).train.optimizer.lr == 0.3


@pytest.mark.parametrize("overrides,fragment", [({"train": 5}, "train must be a mapping of keys, got int 5"),
                                                ({"train.optimizer": None}, "train.optimizer is empty (null)")])
def test_a_malformed_section_is_reported_as_itself_not_as_the_model_default(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")) as e:
        load_config(None, {"model.name": "lenet5", **overrides})
    assert "cannot set" not in str(e.value)
