"""The experiment layer with methods that prune during training, and method comparisons."""
import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from secateurs.allocation import keep_count
from secateurs.cli import main
from secateurs.errors import ConfigError
from secateurs.experiments import RunDir, load_config
from secateurs.experiments.compare import experiment_configs, load_comparison, run_comparison
from secateurs.experiments.runs import RunDir as _RunDir
from secateurs.experiments.sweep import run_sweep
from secateurs.seeding import derive_seed
from secateurs.train import load_checkpoint

BASE = {
    "data": {"dataset": "digits", "batch_size": 64, "eval_batch_size": 512},
    "model": {"name": "lenet300_100"},
    "train": {"epochs": 3, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
    "prune": {"sparsities": [0.8, 0.9]},
}


def run(tmp_path, sub="runs", **overrides):
    config = load_config(None, {**copy.deepcopy(BASE), "name": "during", **overrides})
    rd = RunDir.for_config(config, tmp_path / sub)
    return config, rd, run_sweep(config, rd, progress=False, echo=lambda s: None)


@pytest.mark.parametrize("method", ["granet", "rigl", "gmp"])
def test_during_training_levels_are_exact_and_report_flops(tmp_path, method):
    _, rd, results = run(tmp_path, **{"prune.method": method, "prune.params": {"every": 10}})
    assert results["complete"] and results["timing"] == "during"
    rows = {r["phase"]: r for r in results["levels"]}
    assert set(rows) == {"dense", "sparsity-0.8", "sparsity-0.9"}
    for target in (0.8, 0.9):
        row = rows[f"sparsity-{target:g}"]
        assert row["active"] == keep_count(row["numel"], target)
        assert row["acc_before_finetune"] is None and row["updates"] > 0
        # a dense-to-sparse run costs more to train than its final model costs to run
        flops = row["flops"]
        assert flops["inference"] == pytest.approx(1 - target, abs=0.02)
        assert flops["inference"] <= flops["training"] <= 1.0
        state = load_checkpoint(rd.checkpoint(f"sparsity-{target:g}"))
        for name, mask in state["sparsifier"]["masks"]["masks"].items():
            assert torch.count_nonzero(state["model"][name][~mask]) == 0
    assert rows["dense"]["flops"] == {"inference": 1.0, "training": 1.0}


def test_interrupted_rigl_run_resumes_bit_identically(tmp_path, monkeypatch):
    over = {"prune.method": "rigl", "prune.params": {"every": 7}, "prune.dense_baseline": False}
    _, ref_run, ref = run(tmp_path, "ref", **over)
    original_log = _RunDir.log

    def interrupting_log(self, record):
        original_log(self, record)
        if (record["phase"], record["epoch"]) == ("sparsity-0.9", 1):
            raise KeyboardInterrupt

    monkeypatch.setattr(_RunDir, "log", interrupting_log)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "cut", **over)
    monkeypatch.setattr(_RunDir, "log", original_log)
    _, cut_run, resumed = run(tmp_path, "cut", **over)
    assert [r["test_acc"] for r in resumed["levels"]] == [r["test_acc"] for r in ref["levels"]]
    a, b = load_checkpoint(cut_run.checkpoint("sparsity-0.9")), load_checkpoint(ref_run.checkpoint("sparsity-0.9"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["sparsifier"]["history"] == b["sparsifier"]["history"]


def test_unknown_method_param_lists_the_accepted_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"does not take 'evry'.*accepts: .*drop_fraction.*every"):
        run(tmp_path, **{"prune.method": "rigl", "prune.params": {"evry": 10}})
    with pytest.raises(ConfigError, match="set elsewhere"):
        run(tmp_path, **{"prune.method": "rigl", "prune.params": {"seed": 3}})


def test_a_schedule_that_does_not_reach_the_target_is_an_error(tmp_path):
    # pruning ends after training does: the run would silently report a denser network; the
    # method refuses the schedule point before any training
    with pytest.raises(ConfigError, match=r"GMP end='150%' is step \d+, past the end of training \(total_steps="):
        run(tmp_path, **{"prune.method": "gmp", "prune.params": {"every": 10, "end": "150%"}})


COMPARISON = {
    "name": "cmp",
    "seeds": [0, 1],
    "base": {**BASE, "train": {**BASE["train"], "epochs": 2}, "prune": {"sparsities": [0.9]}},
    "variants": [
        {"label": "GMP", "method": "gmp", "params": {"every": 10}},
        {"label": "SET", "method": "set", "params": {"every": 10}},
    ],
}


def test_comparison_aggregates_seeds_and_reuses_runs(tmp_path, capsys):
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(COMPARISON))
    comparison = load_comparison(path)
    assert [(label, seed) for label, seed, _ in experiment_configs(comparison)] == [
        ("dense", 0), ("GMP", 0), ("SET", 0), ("dense", 1), ("GMP", 1), ("SET", 1)]
    # split across "processes" by seed, then aggregate by running the whole thing again
    partial = run_comparison(comparison, tmp_path / "runs", seeds=(0,), progress=False, echo=lambda s: None)
    assert not partial["complete"] and "GMP seed 1 sparsity-0.9" in partial["missing"]
    messages = []
    summary = run_comparison(comparison, tmp_path / "runs", progress=False, echo=messages.append)
    assert summary["complete"]
    assert sum("reusing finished run" in m for m in messages) == 3  # seed 0 was not retrained
    rows = {(r["method"], r["target_sparsity"]): r for r in summary["rows"]}
    assert set(rows) == {("dense", 0.0), ("GMP", 0.9), ("SET", 0.9)}
    accs = []
    for _, seed, config in experiment_configs(comparison):
        if config.prune.method == "set":
            res = RunDir.for_config(config, tmp_path / "runs").results()
            accs.append(next(r["test_acc"] for r in res["levels"] if r["phase"] == "sparsity-0.9"))
    assert rows[("SET", 0.9)]["test_acc_mean"] == pytest.approx(sum(accs) / 2)
    assert rows[("SET", 0.9)]["test_acc_std"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
    out = Path(summary["dir"])
    assert out.parent == tmp_path / "runs" and out.name.startswith("cmp-") and out.name.endswith("-comparison")
    assert json.loads((out / "comparison.json").read_text())["complete"]
    assert "| 90% | SET |" in (out / "comparison.md").read_text()
    assert (out / "accuracy_vs_sparsity.png").stat().st_size > 1000
    # the CLI prints the same table
    assert main(["compare", "--config", str(path), "--runs-dir", str(tmp_path / "runs"), "--no-progress"]) == 0
    assert "| 90% | GMP |" in capsys.readouterr().out


def test_comparison_rejects_bad_configs(tmp_path):
    bad = {**COMPARISON, "variants": [COMPARISON["variants"][0], COMPARISON["variants"][0]]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="unique"):
        load_comparison(path)
    path.write_text(yaml.safe_dump({**COMPARISON, "variants": [{"label": "x", "method": "nope"}]}))
    with pytest.raises(Exception, match="unknown method 'nope'"):
        run_comparison(load_comparison(path), tmp_path / "r", progress=False, echo=lambda s: None)


@pytest.mark.parametrize("reset", ["rewind", "reinit"])
def test_reset_after_pruning_restores_init_weights_bit_exactly(tmp_path, monkeypatch, reset):
    import secateurs.experiments.sweep as sweep
    from secateurs.data import load_dataset

    captured = {}
    original = sweep._reset

    def spy(config, model, sparsifier, dataset):
        original(config, model, sparsifier, dataset)
        captured["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        captured["masks"] = {k: m.clone() for k, m in sparsifier.masks.masks.items()}

    monkeypatch.setattr(sweep, "_reset", spy)
    config, rd, results = run(tmp_path, **{"prune.sparsities": [0.9], "prune.reset": reset, "finetune.epochs": 1})
    from dataclasses import replace

    digits = load_dataset("digits")
    init = sweep.build_model(config, digits).state_dict()
    fresh = sweep.build_model(replace(config, seed=derive_seed(config.seed, "sweep", "reinit")), digits).state_dict()
    expected = init if reset == "rewind" else fresh
    state, masks = captured["state"], captured["masks"]
    for name, value in state.items():
        kept = masks.get(name, torch.ones_like(value, dtype=torch.bool))
        assert torch.equal(value[kept], expected[name][kept]), name  # bit-equal to the saved start
        assert torch.count_nonzero(value[~kept]) == 0
    if reset == "reinit":
        assert not torch.equal(state["net.1.weight"], init["net.1.weight"] * masks["net.1.weight"])
    assert results["levels"][1]["active"] == keep_count(results["levels"][1]["numel"], 0.9)


def test_at_init_reinit_scores_one_draw_and_trains_another(tmp_path, monkeypatch):
    """SNIP with ``prune.reset: reinit`` (the reference code's practice): the mask is the one
    scored on the seed's initialisation, the weights it trains from are an independent draw."""
    import secateurs.experiments.sweep as sweep
    from dataclasses import replace

    from secateurs.data import load_dataset

    captured = []
    original = sweep._reset

    def spy(config, model, sparsifier, dataset):
        original(config, model, sparsifier, dataset)
        captured.append(({k: v.clone() for k, v in model.state_dict().items()},
                         {k: m.clone() for k, m in sparsifier.masks.masks.items()}))

    monkeypatch.setattr(sweep, "_reset", spy)
    over = {"prune.method": "snip", "prune.sparsities": [0.9], "prune.dense_baseline": False, "train.epochs": 1}
    config, _, results = run(tmp_path, "reinit", **over, **{"prune.reset": "reinit"})
    run(tmp_path, "keep", **over)
    (state, masks), (kept_state, kept_masks) = captured
    for name in masks:
        assert torch.equal(masks[name], kept_masks[name]), name  # the same scored mask
    digits = load_dataset("digits")
    init = sweep.build_model(config, digits).state_dict()
    fresh = sweep.build_model(replace(config, seed=derive_seed(config.seed, "sweep", "reinit")), digits).state_dict()
    for name, value in state.items():
        kept = masks.get(name, torch.ones_like(value, dtype=torch.bool))
        assert torch.equal(value[kept], fresh[name][kept]), name
        assert torch.equal(kept_state[name][kept], init[name][kept]), name
        assert torch.count_nonzero(value[~kept]) == 0
    assert results["levels"][0]["active"] == keep_count(results["levels"][0]["numel"], 0.9)


def test_reset_is_refused_for_a_during_training_method(tmp_path):
    with pytest.raises(ConfigError, match="prune.reset 'reinit' does not apply to 'rigl'"):
        run(tmp_path, **{"prune.method": "rigl", "prune.reset": "reinit"})


def test_unknown_reset_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown prune.reset 'rewnd'; pruning sweeps \(prune.reset\) accepts the resets: keep, rewind, reinit"):
        run(tmp_path, **{"prune.reset": "rewnd"})


def test_a_diverged_run_does_not_stop_the_comparison(tmp_path):
    data = {**COMPARISON, "seeds": [0], "variants": [
        {"label": "boom", "method": "gmp", "params": {"every": 5, "start": "1ep", "end": "90%"},
         "set": {"train.optimizer.lr": 1.0e30}},  # the NaN is caught at the end of epoch 1, before pruning
        COMPARISON["variants"][1],
    ]}
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(data))
    messages = []
    summary = run_comparison(load_comparison(path), tmp_path / "runs", progress=False, echo=messages.append)
    assert summary["diverged"] == ["boom seed 0"]
    assert any("diverged, continuing" in m for m in messages)
    methods = {r["method"] for r in summary["rows"]}
    assert methods == {"dense", "SET"} and "boom seed 0 sparsity-0.9" in summary["missing"]


def test_config_chooses_the_regrowth_rule_by_name(tmp_path):
    """prune.params.regrowth picks a rule of secateurs.regrowth.REGROWTH: RigL regrowing at
    random is SET's rule, and ends with other masks than RigL's gradient regrowth."""
    from secateurs.regrowth import GradientRegrowth, RandomRegrowth
    import secateurs.experiments.sweep as sweep

    built = []
    original = sweep.build_sparsifier

    def spy(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    over = {"prune.method": "rigl", "prune.sparsities": [0.9], "prune.dense_baseline": False, "train.epochs": 1}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sweep, "build_sparsifier", spy)
        _, gradient_run, _ = run(tmp_path, "gradient", **over, **{"prune.params": {"every": 5}})
        assert type(built[-1].regrowth) is GradientRegrowth
        _, random_run, _ = run(tmp_path, "random", **over, **{"prune.params": {"every": 5, "regrowth": "random"}})
        assert type(built[-1].regrowth) is RandomRegrowth
    a = load_checkpoint(gradient_run.checkpoint("sparsity-0.9"))["sparsifier"]["masks"]["masks"]
    b = load_checkpoint(random_run.checkpoint("sparsity-0.9"))["sparsifier"]["masks"]["masks"]
    assert any(not torch.equal(a[n], b[n]) for n in a)


def test_unknown_regrowth_rule_lists_the_known_ones(tmp_path):
    from secateurs.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="unknown regrowth rule 'momentum'; known regrowth rules: cosine, gradient, random"):
        run(tmp_path, **{"prune.method": "granet", "prune.params": {"every": 5, "regrowth": "momentum"}})
    with pytest.raises(ConfigError, match="regrowth must be a rule name"):
        run(tmp_path, **{"prune.method": "set", "prune.params": {"regrowth": 3}})
