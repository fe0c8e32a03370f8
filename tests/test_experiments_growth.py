"""The growth experiment (`secateurs grow`): every arm reaches its widths, an interrupted run
resumes mid-growth to the same result, finished arms are not redone, and the CLI runs it."""
import copy
import dataclasses
import json

import pytest
import yaml

from secateurs.cli import main
from secateurs.data import load_dataset
from secateurs.errors import ConfigError
from secateurs.experiments.growth import load_growth_config, run_growth
from secateurs.experiments.runs import RunDir
from secateurs.train import Trainer

# 45 steps per epoch on 720 digits at batch 16; growth at steps 30, 60, 90 (epochs 1 and 2)
BASE = {
    "name": "g",
    "seeds": [0],
    "data": {"dataset": "digits", "batch_size": 16, "eval_batch_size": 512},
    "train": {"epochs": 3, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "eval_every": 15},
    "growth": {"start": [6, 4], "target": [18, 10], "arms": ["gradmax", "random", "big"],
               "start_step": 30, "every": 30, "events": 3, "grad_batches": 2, "loss_subset": 300},
}


@pytest.fixture(scope="module")
def digits():
    full = load_dataset("digits")
    return dataclasses.replace(full, train_images=full.train_images[:720], train_labels=full.train_labels[:720])


def growth(root, digits, data=None):
    config = load_growth_config(None, copy.deepcopy(data or BASE))
    run = RunDir.for_config(config, root)
    return config, run, run_growth(config, run, progress=False, echo=lambda s: None, dataset=digits)


@pytest.fixture(scope="module")
def clean(tmp_path_factory, digits):
    return growth(tmp_path_factory.mktemp("clean"), digits)


def test_every_arm_ends_at_its_widths_with_growth_events_recorded(clean):
    _, run, results = clean
    assert results["complete"]
    rows = {r["arm"]: r for r in results["rows"]}
    assert rows["gradmax"]["widths"] == rows["random"]["widths"] == rows["big"]["widths"] == [18, 10]
    assert rows["gradmax"]["parameters"] == rows["big"]["parameters"]
    events = rows["gradmax"]["growth"]
    assert [(e["step"], e["layer"], e["width"]) for e in events] == [
        (30, "net.1", 10), (30, "net.3", 6), (60, "net.1", 14), (60, "net.3", 8), (90, "net.1", 18), (90, "net.3", 10)]
    assert all(e["grad_norm"] > 0 for e in events) and rows["big"]["growth"] == []
    assert [p["step"] for p in rows["gradmax"]["curve"]] == list(range(15, 136, 15))
    assert (run.path / "growth_loss.png").stat().st_size > 0 and "gradmax" in (run.path / "growth.md").read_text()


def test_an_interrupted_run_resumes_mid_growth_to_the_same_result(tmp_path, digits, clean, monkeypatch):
    real = Trainer._train_epoch
    calls = {"n": 0}

    def crash_in_second_epoch(self):
        calls["n"] += 1
        if calls["n"] == 2:  # epoch 1 (with one growth event) is checkpointed; die in epoch 2
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "_train_epoch", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        growth(tmp_path, digits)
    monkeypatch.setattr(Trainer, "_train_epoch", real)
    _, run, results = growth(tmp_path, digits)
    expected = {r["arm"]: r for r in clean[2]["rows"]}
    for row in results["rows"]:
        assert row["test_acc"] == expected[row["arm"]]["test_acc"]
        assert row["train_loss"] == pytest.approx(expected[row["arm"]]["train_loss"], rel=1e-6)
    # finished: a re-run only re-reads it
    monkeypatch.setattr(Trainer, "fit", lambda self: pytest.fail("a finished run was retrained"))
    assert growth(tmp_path, digits)[2]["rows"] == results["rows"]


def test_growth_must_finish_within_training_and_bad_settings_are_refused(tmp_path, digits):
    late = copy.deepcopy(BASE)
    late["growth"].update(arms=["random"], every=100)
    with pytest.raises(ConfigError, match="ended before growing"):
        growth(tmp_path, digits, late)
    for key, value, match in [("arms", ["gradmax", "xavier"], "growth.arms"), ("start", [20, 4], "start <= target"),
                              ("target", [18], "one width per hidden layer")]:
        bad = copy.deepcopy(BASE)
        bad["growth"][key] = value
        with pytest.raises(ConfigError, match=match):
            load_growth_config(None, bad)


def test_cli_runs_the_growth_comparison(tmp_path, capsys):
    config = copy.deepcopy(BASE)
    config["growth"]["arms"] = ["zero"]
    config["train"]["epochs"] = 2
    config["growth"]["start_step"] = 20
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["grow", "--config", str(path), "--runs-dir", str(tmp_path / "runs"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| zero | 1 | [18, 10]" in out
    results = json.loads(next((tmp_path / "runs").glob("g-*/results.json")).read_text())
    assert results["complete"] and results["rows"][0]["widths"] == [18, 10]
