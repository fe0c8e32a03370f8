"""The structured-pruning experiment (`secateurs structured`): FLOP targets, compact export,
exact resume of an interrupted prune-and-fine-tune loop, config checks and the CLI."""
import copy
import dataclasses
import json

import pytest
import torch
import yaml

from secateurs.cli import main
from secateurs.data import load_dataset
from secateurs.errors import ConfigError, UnknownNameError
from secateurs.experiments.runs import RunDir
from secateurs.experiments.structured import load_structured_config, measure_latency, run_structured
from secateurs.experiments.sweep import _Data
from secateurs.structured import load_compact

# Conv-2 takes the 8x8 digits (one 2x2 pool); two levels, each reached in two Taylor steps
BASE = {
    "name": "st",
    "data": {"dataset": "digits", "batch_size": 64, "eval_batch_size": 512},
    "model": {"name": "conv2"},
    "train": {"epochs": 1, "optimizer": {"name": "adam", "lr": 2e-3}},
    "finetune": {"epochs": 2, "optimizer": {"name": "adam", "lr": 5e-4}},
    "structured": {"flops_removed": [0.3, 0.6], "importance": "taylor", "steps": 2, "taylor_batches": 2,
                   "latency_repeats": 2, "latency_batches": [1, 8], "latency_threads": 1},
}


@pytest.fixture(scope="module")
def digits():
    full = load_dataset("digits")  # 512 of the 1437 training images keep the runs short
    return dataclasses.replace(full, train_images=full.train_images[:512], train_labels=full.train_labels[:512])


def structured(root, digits, data=None, echo=lambda s: None):
    config = load_structured_config(None, copy.deepcopy(data or BASE))
    run = RunDir.for_config(config, root)
    return config, run, run_structured(config, run, progress=False, echo=echo, dataset=digits)


@pytest.fixture(scope="module")
def clean(tmp_path_factory, digits):
    return structured(tmp_path_factory.mktemp("clean"), digits)


def test_levels_reach_their_flop_targets_and_the_compact_models_reload(clean, digits):
    config, run, results = clean
    assert results["complete"] and [r["phase"] for r in results["levels"]] == ["flops-0.3", "flops-0.6"]
    dense = results["dense"]
    data = _Data(config, digits)
    for row in results["levels"]:
        assert row["flops_removed"] == pytest.approx(row["target_flops_removed"], abs=0.02)
        assert row["macs_fraction"] == pytest.approx(row["macs"] / dense["macs"])
        assert row["parameters"] < dense["parameters"]
        steps = row["step_details"]
        assert [s["step"] for s in steps] == [1, 2]
        assert steps[0]["flops_removed"] == pytest.approx(row["target_flops_removed"] / 2, abs=0.02)
        assert all(row["channels"][g] <= dense["channels"][g] for g in dense["channels"])
        assert row["drop_pt"] == pytest.approx(100 * (dense["test_acc"] - row["test_acc"]))
        assert set(row["latency_ms"]) == {"dense", "pruned"} and set(row["speedup"]) == {"batch_1", "batch_8"}
        # the exported model needs only torch and reproduces the fine-tuned accuracy
        path = run.path / "compact" / f"{row['phase']}.pt2"
        assert row["compact"]["bytes"] == path.stat().st_size < dense["compact"]["bytes"]
        compact = load_compact(path)
        with torch.no_grad():
            correct = sum(int((compact(x).argmax(1) == y).sum()) for x, y in data.test)
        assert correct / len(digits.test_labels) == pytest.approx(row["test_acc"], abs=1e-9)
    table = (run.path / "structured.md").read_text()
    assert "| 30% |" in table and "| 60% |" in table and "batch-8 ms dense / pruned" in table
    assert "OMP_WAIT_POLICY" in table


def test_an_interrupted_run_resumes_mid_finetune_without_repeating_work(clean, tmp_path, monkeypatch, digits):
    original_log = RunDir.log

    def interrupting_log(self, record):
        original_log(self, record)
        if (record["phase"], record["epoch"]) == ("flops-0.6-step-2", 1):  # second step of the second level
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "log", interrupting_log)
    with pytest.raises(KeyboardInterrupt):
        structured(tmp_path, digits)
    monkeypatch.setattr(RunDir, "log", original_log)
    said = []
    _, run, resumed = structured(tmp_path, digits, echo=said.append)
    assert "resumed flops-0.6-step-2 at epoch 1/2" in said
    logged = [(r["phase"], r["epoch"]) for r in map(json.loads, run.metrics_path.read_text().splitlines())]
    assert len(logged) == len(set(logged))  # no epoch trained twice
    assert ("flops-0.6-step-2", 2) in logged
    for a, b in zip(clean[2]["levels"], resumed["levels"], strict=True):
        for key in ("test_acc", "test_loss", "acc_before_finetune", "macs", "parameters", "channels", "step_details"):
            assert a[key] == b[key], key
        assert a["compact"]["test_acc"] == b["compact"]["test_acc"]


def test_a_changed_config_is_refused_and_a_finished_run_is_reused(clean, digits):
    config, run, results = clean
    changed = load_structured_config(None, {**copy.deepcopy(BASE), "structured": {**BASE["structured"], "steps": 1}})
    with pytest.raises(ConfigError, match="different config.*structured.steps"):
        run_structured(changed, run, progress=False, echo=lambda s: None, dataset=digits)
    said = []
    assert run_structured(config, run, progress=False, echo=said.append) == results
    assert said == [f"reusing finished run {run.path}"]


def test_bad_settings_name_the_known_values():
    with pytest.raises(UnknownNameError, match="known: bn_scale, l1, taylor"):
        load_structured_config(None, {"structured": {"importance": "l2"}})
    with pytest.raises(UnknownNameError, match="structured.scope 'erk' does not apply to structured pruning.*uniform, global"):
        load_structured_config(None, {"structured": {"scope": "erk"}})
    with pytest.raises(UnknownNameError, match="unknown structured.scope 'local'.*accepts the scopes: uniform, global"):
        load_structured_config(None, {"structured": {"scope": "local"}})
    # configs/structured_*.yaml spell it 'layerwise': read as 'uniform', the same run (same hash)
    old = load_structured_config(None, {"structured": {"scope": "layerwise"}})
    assert old.structured.scope == "uniform" and old.short_hash() == load_structured_config(None, {}).short_hash()
    with pytest.raises(ConfigError, match=r"in \(0, 1\)"):
        load_structured_config(None, {"structured": {"flops_removed": [0.5, 1.0]}})
    with pytest.raises(ConfigError, match="steps must be an integer >= 1"):
        load_structured_config(None, {"structured": {"steps": 0}})
    with pytest.raises(ConfigError, match="latency_batches"):
        load_structured_config(None, {"structured": {"latency_batches": [0]}})
    with pytest.raises(ConfigError, match="known keys under structured"):
        load_structured_config(None, {"structured": {"flops": [0.5]}})


def test_latency_restores_the_thread_count():
    before = torch.get_num_threads()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    out = measure_latency({"a": model, "b": model}, torch.randn(1, 1, 8, 8), batch_sizes=(1, 4), repeats=2,
                          min_seconds=1e-4)
    assert set(out["a"]) == {"batch_1", "batch_4"} and all(v > 0 for v in out["b"].values())
    assert torch.get_num_threads() == before


def test_cli_prints_the_table(clean, tmp_path, capsys):
    config, run, _ = clean
    path = tmp_path / "st.yaml"
    path.write_text(yaml.safe_dump(copy.deepcopy(BASE)))
    assert main(["structured", "--config", str(path), "--runs-dir", str(run.path.parent), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"run directory: {run.path}" in out
    assert "| level | FLOPs removed | params | MACs |" in out and "| 60% |" in out
    assert main(["structured", "--config", str(path), "--set", "structured.importance=l2"]) == 2
    assert "known: bn_scale, l1, taylor" in capsys.readouterr().err
