"""Supermasks with a denser output layer (Zhou et al. 2019 prune the output layer of FC
300-100-10 at half the rate of the hidden layers: ``--prune_base 0.8,0.9``)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from secateurs.allocation import keep_count
from secateurs.errors import ConfigError
from secateurs.experiments.lottery import format_lottery, load_lottery_config
from secateurs.methods import criterion_masks, half_rate_output_sparsity

SHAPES = {"fc1.weight": (300, 784), "fc2.weight": (100, 300), "fc3.weight": (10, 100)}  # LeNet-300-100


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(*s, generator=g) for n, s in SHAPES.items()}


@pytest.mark.parametrize("scope", ["uniform", "global", "erk"])
@pytest.mark.parametrize("sparsity,output_sparsity", [(0.5, 0.0), (0.9, 0.3), (0.95, 0.5), (0.8, 0.8)])
def test_output_layer_gets_its_density_and_the_rest_reach_the_total(scope, sparsity, output_sparsity):
    masks = criterion_masks(weights(0), weights(1), "large_final_same_sign", sparsity, scope=scope,
                            output_sparsity=output_sparsity)
    numel = {n: math.prod(s) for n, s in SHAPES.items()}
    assert int(masks["fc3.weight"].sum()) == keep_count(numel["fc3.weight"], output_sparsity)
    total = sum(int(m.sum()) for m in masks.values())
    target = keep_count(sum(numel.values()), sparsity)
    # global/erk are exact; uniform rounds each of the two hidden layers once
    assert abs(total - target) <= (0 if scope != "uniform" else 1)
    if scope == "uniform":  # the hidden layers share one sparsity
        d1, d2 = (int(masks[n].sum()) / numel[n] for n in ("fc1.weight", "fc2.weight"))
        assert d1 == pytest.approx(d2, abs=1e-2)


def test_same_as_before_without_output_sparsity():
    a = criterion_masks(weights(0), weights(1), "large_final", 0.7)
    for n, m in a.items():
        assert int(m.sum()) == keep_count(m.numel(), 0.7)


def test_half_rate_matches_zhou_prune_base():
    numel = [math.prod(s) for s in SHAPES.values()]
    for sparsity in (0.5, 0.8, 0.95):
        out = half_rate_output_sparsity(numel, sparsity)
        p = math.log(1 - out) / math.log(0.9)  # the common pruning power
        kept = 0.8 ** p * sum(numel[:2]) + 0.9 ** p * numel[2]
        assert kept == pytest.approx((1 - sparsity) * sum(numel), rel=1e-9)
        assert out < sparsity  # the output layer is denser
    assert half_rate_output_sparsity(numel, 0.0) == pytest.approx(0.0, abs=1e-12)


def test_impossible_output_density_is_refused():
    with pytest.raises(ConfigError, match="output-layer sparsity"):  # a 10-weight net, output dense, 99% sparse
        criterion_masks({"a": torch.randn(1, 2), "b": torch.randn(8)}, {"a": torch.randn(1, 2), "b": torch.randn(8)},
                        "large_final", 0.5, output_sparsity=0.0)


def test_config_outputs_are_checked_and_listed():
    base = {"name": "x", "data": {"dataset": "digits"}, "model": {"name": "lenet300_100"},
            "lottery": {"supermask": {"sparsities": [0.5], "outputs": ["same", "half_rate", "dense"]}}}
    assert load_lottery_config(None, base).lottery.supermask.outputs == ("same", "half_rate", "dense")
    with pytest.raises(ConfigError, match="outputs"):
        load_lottery_config(None, {**base, "lottery": {"supermask": {"outputs": ["half"]}}})
    row = {"criterion": "large_final_same_sign", "sparsity": 0.5, "init": "original"}
    md = format_lottery({"rounds": [], "supermask": [{**row, "test_acc": {"mean": 0.7, "std": 0.0, "n": 1}},
                                                     {**row, "output": "dense", "test_acc": {"mean": 0.8, "std": 0.0, "n": 1}}]})
    assert "| output layer |" in md and "| dense | 80.00 |" in md and "| same | 70.00 |" in md


def test_experiment_scores_each_output_treatment(tmp_path):
    from secateurs.experiments.lottery import run_lottery_seeds

    config = load_lottery_config(None, {
        "name": "sm", "data": {"dataset": "digits", "batch_size": 64, "validation": 200},
        "model": {"name": "lenet300_100"}, "train": {"epochs": 1, "optimizer": {"name": "adam", "lr": 2e-3}},
        "lottery": {"rounds": 0, "supermask": {"sparsities": [0.9], "inits": ["original"],
                                               "outputs": ["same", "half_rate", "dense"]}}})
    summary = run_lottery_seeds(config, [0], tmp_path / "runs", tmp_path / "out", progress=False, echo=lambda s: None)
    assert [r.get("output", "same") for r in summary["supermask"]] == ["same", "half_rate", "dense"]
    rows = json.loads(next((tmp_path / "runs").glob("*/supermask.json")).read_text())
    dense = next(r for r in rows if r.get("output") == "dense")["layer_density"]
    half = next(r for r in rows if r.get("output") == "half_rate")["layer_density"]
    out = list(dense)[-1]
    assert dense[out] == 1.0 and 0.1 < half[out] < 1.0
    assert "| output layer |" in (tmp_path / "out" / "lottery.md").read_text()


def test_output_treatment_is_refused_when_the_last_masked_layer_is_not_the_output(tmp_path):
    # the classifier excluded from masking: the last masked layer is a hidden one (100 outputs),
    # which half_rate / dense must never pin as "the output layer"
    from secateurs.experiments.lottery import run_lottery_seeds

    config = load_lottery_config(None, {
        "name": "sm", "data": {"dataset": "digits", "batch_size": 64, "validation": 200},
        "model": {"name": "lenet300_100"}, "train": {"epochs": 1, "optimizer": {"name": "adam", "lr": 2e-3}},
        "lottery": {"rounds": 0, "exclude": ["net.5.weight"],
                    "supermask": {"sparsities": [0.9], "inits": ["original"], "outputs": ["same", "dense"]}}})
    summary = run_lottery_seeds(config, [0], tmp_path / "runs", tmp_path / "out", progress=False, echo=lambda s: None)
    [failed] = summary["failed"]  # the runner reports the seed's error by its unit; nothing is scored
    assert "net.3.weight has 100 outputs, not the 10 classes" in failed["error"]
    assert not summary["supermask"]
