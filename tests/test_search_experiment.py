"""The search study (``secateurs search``): every strategy on one front, candidates shared
between strategies and trained once, random search at PNAS's cost, resume to identical
results after an interruption, and the Pareto / hypervolume arithmetic by hand."""
import json
from pathlib import Path

import pytest
import yaml

from secateurs.errors import ConfigError
from secateurs.experiments.search import hypervolume, load_search_config, pareto_front, run_search

TINY = {
    "name": "tiny-search",
    "device": "cpu",
    "data": {"dataset": "digits", "batch_size": 64, "eval_batch_size": 512, "validation": 300},
    "space": {"ops": ["conv3", "dwsep3"], "conv_widths": [4, 8], "fc_widths": [16, 32], "max_conv": 2, "max_fc": 1},
    "train": {"epochs": 1, "optimizer": {"name": "adam", "lr": 0.01}, "lr_schedule": {"name": "constant"}},
    "strategies": ["pnas", "random", "zoo"],
    "search_seeds": [0, 1],
    "pnas": {"k": 2, "first_level": 3, "members": 2},
    "zoo": ["lenet300_100"],
    "latency_repeats": 3,
}


def _config(tmp_path, **changes):
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({**TINY, **changes}))
    return load_search_config(path)


def test_pareto_front_by_hand():
    points = [(1.0, 0.5), (2.0, 0.7), (1.5, 0.4), (3.0, 0.7), (0.5, 0.3), (2.5, 0.9)]
    assert pareto_front(points) == [4, 0, 1, 5]
    assert pareto_front([(1.0, 0.5), (1.0, 0.5)]) == [0]


def test_hypervolume_by_hand():
    # steps: from 1 to 2 at 0.5, from 2 to 4 at 0.8; the point past the reference adds nothing
    assert hypervolume([(1.0, 0.5), (2.0, 0.8), (5.0, 0.99)], 4.0) == pytest.approx(0.5 + 1.6)
    assert hypervolume([(1.0, 0.5), (1.5, 0.4)], 2.0) == pytest.approx(0.5)
    assert hypervolume([], 1.0) == 0.0


def test_search_runs_every_strategy_shares_candidates_and_resumes(tmp_path):
    config = _config(tmp_path)
    runs = tmp_path / "runs"
    summary = run_search(config, runs, progress=False, echo=lambda m: None)
    assert summary["complete"] and not summary["failed"]
    by = {r["strategy"]: r for r in summary["table"]}
    assert set(by) == {"pnas", "random", "zoo"}
    for seed in (0, 1):
        pnas = [r for r in summary["candidates"] if r["strategy"] == "pnas" and r["search_seed"] == seed]
        random = [r for r in summary["candidates"] if r["strategy"] == "random" and r["search_seed"] == seed]
        assert len(pnas) == summary["searches"]["pnas"][seed]["trained"] == len(random)  # equal cost
        assert len(pnas) == 3 + 2 + 2  # level 1: first_level=3; levels 2 and 3 (2 conv + 1 fc blocks): k=2 each
    assert summary["latency_prediction"]["networks"] == len([r for r in summary["candidates"] if r["architecture"]])
    ablation = summary["indicator_ablation"]  # with and without TE-NAS features, same folds
    assert len(ablation["spearman"]) == 2 and ablation["candidates"] >= 10
    out = Path(summary["dir"])
    for name in ("search.json", "search.md", "candidates.csv", "pareto.png"):
        assert (out / name).is_file()
    # every candidate trained once, in its own run directory named by its config
    trained = [p for p in runs.iterdir() if p.name.startswith("candidate-")]
    distinct = {(r["label"], r["search_seed"]) for r in summary["candidates"]}
    assert len(trained) == len(distinct)
    # a second run reuses everything and reports the same
    again = run_search(config, runs, progress=False, echo=lambda m: None)
    assert json.dumps(again["table"], sort_keys=True) == json.dumps(summary["table"], sort_keys=True)


def _accuracies(summary):
    return sorted((r["strategy"], r["search_seed"], r["label"], r["val_acc"], r["test_acc"]) for r in summary["candidates"])


def test_an_interrupted_search_resumes_to_identical_results(tmp_path, monkeypatch):
    import secateurs.experiments.search as search

    config = _config(tmp_path, search_seeds=[0], strategies=["pnas", "random"])
    straight = run_search(config, tmp_path / "a", progress=False, echo=lambda m: None)
    real, calls = search._train_candidate, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # in PNAS's second level
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(search, "_train_candidate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_search(config, tmp_path / "b", progress=False, echo=lambda m: None)
    monkeypatch.setattr(search, "_train_candidate", real)
    resumed = run_search(config, tmp_path / "b", progress=False, echo=lambda m: None)
    assert _accuracies(resumed) == _accuracies(straight)
    assert resumed["searches"]["pnas"][0]["history"] == straight["searches"]["pnas"][0]["history"]


def test_a_budget_no_candidate_meets_names_the_smallest_cost(tmp_path):
    config = _config(tmp_path, budget={"macs": 10})
    with pytest.raises(ConfigError, match="MACs"):
        run_search(config, tmp_path / "runs", progress=False, echo=lambda m: None)
    assert not list((tmp_path / "runs").glob("candidate-*"))  # refused before anything trained


@pytest.mark.parametrize("changes, message", [
    (dict(strategies=["random"]), "list pnas too"),
    (dict(strategies=["bayes"]), "strategies must list"),
    (dict(data={"dataset": "digits"}), "set data.validation"),
    (dict(search_seeds=[0, 0]), "distinct seeds"),
    (dict(pnas={"k": 0}), "pnas.k"),
])
def test_bad_search_configs(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, **changes)


def test_dnas_settings_the_study_owns_are_refused_not_replaced(tmp_path):
    config = _config(tmp_path, strategies=["dnas"], dnas={"latency_table": "/elsewhere.json"})
    with pytest.raises(ConfigError, match="dnas.latency_table is set by the search study"):
        run_search(config, tmp_path / "runs", progress=False, echo=lambda m: None)


def test_a_zoo_model_that_cannot_read_the_images_is_refused_up_front(tmp_path):
    config = _config(tmp_path, zoo=["lenet5"])  # two valid 5x5 convs and two pools: not on 8x8 digits
    with pytest.raises(ConfigError, match="lenet5 needs image_size >= 16"):
        run_search(config, tmp_path / "runs", progress=False, echo=lambda m: None)


def test_dnas_and_grow_prune_results_are_retrained_as_candidates(tmp_path):
    config = _config(tmp_path, search_seeds=[0], strategies=["dnas", "grow_prune"],
                     dnas={"latency": "macs", "subset": 400,
                           "search": {"stages": [1, 1], "epochs": 2, "prune_warmup_epochs": 1}},
                     grow_prune={"start": [8], "cycles": 2})
    summary = run_search(config, tmp_path / "runs", progress=False, echo=lambda m: None)
    assert not summary["failed"]
    for strategy in ("dnas", "grow_prune"):
        derived = summary["searches"][strategy][0]["architecture"]
        [row] = [r for r in summary["candidates"] if r["strategy"] == strategy]
        assert row["label"] == derived  # the search's network, trained from scratch like any candidate
        assert summary["searches"][strategy][0]["cpu_seconds"] > 0
    assert summary["searches"]["grow_prune"][0]["architecture"].startswith("fc-")
