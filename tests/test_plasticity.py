"""Pruning plasticity study: the grid, the learning rate of the moment, resume."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from secateurs.cli import main
from secateurs.errors import ConfigError
from secateurs.experiments.plasticity import load_plasticity, run_plasticity
from secateurs.train import load_checkpoint

STUDY = {
    "name": "pl",
    "prune_epochs": [1, 2],
    "ratios": [0.5, 0.9],
    "continue_epochs": 1,
    "regeneration": {"every": 5},
    "base": {
        "data": {"dataset": "digits", "batch_size": 64, "eval_batch_size": 512},
        "model": {"name": "lenet300_100"},
        "train": {"epochs": 3, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                  "lr_schedule": {"name": "multistep", "milestones": [2], "gamma": 0.1}},
    },
}


def write(tmp_path, data=STUDY):
    path = tmp_path / "pl.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_plasticity_grid_uses_the_learning_rate_of_the_moment_and_resumes(tmp_path, capsys):
    study = load_plasticity(write(tmp_path))
    result = run_plasticity(study, tmp_path / "runs", progress=False, echo=lambda s: None)
    cells = result["cells"]
    assert len(cells) == 2 * 2 * 2
    for c in cells:
        assert c["sparsity"] == pytest.approx(c["ratio"], abs=1e-5)
        assert c["plasticity"] == pytest.approx(c["acc_continue"] - c["acc_pre"])
    lrs = {c["epoch"]: c["lr"] for c in cells}
    assert lrs == {1: pytest.approx(0.05), 2: pytest.approx(0.005)}  # the LR decays at epoch 2
    # acc_pre is the dense network's: identical with and without regeneration
    for t in (1, 2):
        for r in (0.5, 0.9):
            a, b = (next(c for c in cells if (c["epoch"], c["ratio"], c["regeneration"]) == (t, r, g)) for g in (False, True))
            assert a["acc_pre"] == b["acc_pre"] and a["acc_pruned"] == b["acc_pruned"]
    snap = load_checkpoint(tmp_path / "runs" / next(p.name for p in (tmp_path / "runs").iterdir() if p.name.startswith("pl-dense")) / "checkpoints" / "epoch-2.pt")
    assert snap["train_state"]["epoch"] == 2
    out = Path(result["dir"])
    assert out.parent == tmp_path / "runs" and out.name.startswith("pl-") and out.name.endswith("-plasticity")
    assert (out / "plasticity.png").stat().st_size > 1000
    # resume: every cell is a unit with its own run directory; a finished one is reused, a
    # missing one recomputed (to the same numbers)
    from secateurs.experiments.plasticity import cells as grid
    from secateurs.experiments.runs import RunDir

    lost = [RunDir.for_config(c, tmp_path / "runs").results_path for c in grid(study)[5:]]
    for path in lost:
        path.unlink()
    messages = []
    again = run_plasticity(study, tmp_path / "runs", progress=False, echo=messages.append)
    assert sum(": finished in " in m for m in messages) == 3 and len(again["cells"]) == 8
    assert again["cells"] == cells
    assert main(["plasticity", "--config", str(write(tmp_path)), "--runs-dir", str(tmp_path / "runs"), "--no-progress"]) == 0
    assert "without / with regeneration" in capsys.readouterr().out
    # a changed setting is a new study in its own directory, never the old cells (issue 16's
    # plasticity bug: continue_epochs / regeneration / base changes reused the old results)
    changed = run_plasticity(replace(study, regeneration=replace(study.regeneration, every=7)), tmp_path / "runs",
                             progress=False, echo=lambda s: None)
    assert changed["dir"] != result["dir"] and len(changed["cells"]) == 8
    assert [c["acc_continue"] for c in changed["cells"] if c["regeneration"]] != [c["acc_continue"] for c in again["cells"] if c["regeneration"]]
    assert json.loads((out / "plasticity.json").read_text())["cells"] == again["cells"], "the first study is untouched"
    # --set works as for train, and lands in its own directory too
    assert main(["plasticity", "--config", str(write(tmp_path)), "--runs-dir", str(tmp_path / "runs"), "--no-progress",
                 "--set", "continue_epochs=2"]) == 0
    assert len(list((tmp_path / "runs").glob("pl-*-plasticity"))) == 3


def test_plasticity_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="beyond the dense run"):
        load_plasticity(write(tmp_path, {**STUDY, "prune_epochs": [5]})).experiment()
    with pytest.raises(ConfigError, match="ratios entry"):
        load_plasticity(write(tmp_path, {**STUDY, "ratios": [1.0]}))
    with pytest.raises(ConfigError, match="not shorter"):
        run_plasticity(load_plasticity(write(tmp_path, {**STUDY, "regeneration": {"every": 10000}})),
                       tmp_path / "runs", progress=False, echo=lambda s: None)


def test_cells_mark_a_failure_unless_the_config_sets_health_and_the_table_shows_it(tmp_path, monkeypatch):
    from secateurs import train
    from secateurs.experiments.plasticity import _write, format_plasticity

    seen = []

    class Recording(train.Trainer):
        def __init__(self, model, data, cfg, **kwargs):
            seen.append((kwargs.get("progress_desc"), cfg.health))
            super().__init__(model, data, cfg, **kwargs)

    monkeypatch.setattr(train, "Trainer", Recording)
    small = {**STUDY, "prune_epochs": [1], "ratios": [0.5],
             "base": {**STUDY["base"], "train": {**STUDY["base"]["train"], "epochs": 1, "lr_schedule": {"name": "constant"}}}}
    run_plasticity(load_plasticity(write(tmp_path, small)), tmp_path / "a", progress=False, echo=lambda s: None)
    assert seen == [("dense", "error"), ("t=1 p=0.5", "mark"), ("t=1 p=0.5 +regen", "mark")]
    seen.clear()
    run_plasticity(load_plasticity(write(tmp_path, small), {"base.train.health": "error"}), tmp_path / "b",
                   progress=False, echo=lambda s: None)
    assert [h for _, h in seen] == ["error"] * 3, "an explicit health: error is kept for the cells too"
    # the verdict is in the table and the CSV, not only in the JSON
    cell = {"epoch": 1, "ratio": 0.5, "lr": 0.05, "acc_pre": 0.9, "acc_pruned": 0.5, "acc_continue": 0.1,
            "plasticity": -0.8, "sparsity": 0.5}
    cells = [{**cell, "regeneration": False, "health": "after epoch 1 the training loss is 2.3, not below chance"},
             {**cell, "regeneration": True, "health": None}]
    table = format_plasticity(cells)
    assert "-80.00! / -80.00 |" in table
    assert "! epoch 1, prune 50%, regeneration off: after epoch 1 the training loss is 2.3, not below chance" in table
    _write(tmp_path, load_plasticity(write(tmp_path, small)), cells)
    lines = (tmp_path / "plasticity.csv").read_text().splitlines()
    assert lines[0].endswith(",health") and lines[1].endswith(',"after epoch 1 the training loss is 2.3, not below chance"')
    assert lines[2].endswith(",ok")
