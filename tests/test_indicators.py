"""TE-NAS training-free indicators: the NTK against hand-computed kernels, linear regions on
constructed points, seeded determinism, the combined ranking, and the indicators-vs-accuracy
experiment end to end (rows, taus, plot) with resume."""
import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from secateurs.analysis.indicators import (
    empirical_ntk, indicators, linear_regions, ntk_condition_number, rank_architectures,
)
from secateurs.data import load_dataset
from secateurs.errors import ConfigError
from secateurs.experiments.indicators import (
    Architecture, build_candidate, format_indicators, load_indicators_config, run_indicators,
)
from secateurs.experiments.runs import RunDir


# -- the NTK ---------------------------------------------------------------------------------------
def test_ntk_of_a_linear_model_is_outputs_times_the_augmented_gram_matrix():
    # f(x) = W x + b, C outputs summed: d(sum f)/dW = 1 x^T, d/db = 1, so Theta_ij = C (x_i . x_j + 1)
    model = nn.Linear(5, 3)
    x = torch.randn(7, 5)
    expected = 3 * (x.double() @ x.double().T + 1)
    assert torch.allclose(empirical_ntk(model, x), expected, rtol=1e-5, atol=1e-5)


def test_ntk_matches_per_sample_backward_through_a_train_mode_batch_norm():
    # TE-NAS's loop: one batched forward, then the gradient of each sample's summed logits
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(5, 4)
    out = model(x).sum(dim=1)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[i], list(model.parameters()), retain_graph=True)])
            for i in range(5)]
    j = torch.stack(rows).double()
    bn = model[1]
    bn.reset_running_stats()
    assert torch.allclose(empirical_ntk(model, x), j @ j.T, rtol=1e-5, atol=1e-6)
    assert bn.num_batches_tracked == 0 and torch.all(bn.running_mean == 0)  # measuring changed nothing
    assert model.training


def test_condition_number_of_a_known_kernel_and_inf_when_singular():
    model = nn.Linear(2, 1)
    # Theta = [[2, 1], [1, 2]]: eigenvalues 1 and 3
    out = ntk_condition_number(model, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert out["condition_number"] == pytest.approx(3.0) and out["batch"] == 2
    assert (out["eig_min"], out["eig_max"]) == (pytest.approx(1.0), pytest.approx(3.0))
    # a repeated input makes two rows of J equal: a singular kernel
    singular = ntk_condition_number(model, torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0]]))
    assert singular["condition_number"] == math.inf
    with pytest.raises(ConfigError, match="at least 2 inputs"):
        ntk_condition_number(model, torch.ones(1, 2))


# -- linear regions --------------------------------------------------------------------------------
@pytest.mark.parametrize("inplace", [False, True])
def test_linear_regions_of_a_one_dimensional_relu_net(inplace):
    # hidden units relu(x), relu(x - 1), relu(x - 2): kinks at 0, 1, 2 split the line into 4 pieces
    model = nn.Sequential(nn.Linear(1, 3), nn.ReLU(inplace=inplace), nn.Linear(3, 1))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.copy_(torch.tensor([0.0, -1.0, -2.0]))
    points = torch.tensor([[-1.0], [-0.5], [0.5], [1.5], [2.5], [3.0]])
    assert linear_regions(model, points) == {"regions": 4, "samples": 6, "relu_units": 3}
    assert linear_regions(model, points[:3]) == {"regions": 2, "samples": 3, "relu_units": 3}


def test_linear_regions_need_relu_modules():
    with pytest.raises(ConfigError, match="no nn.ReLU modules"):
        linear_regions(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), torch.randn(5, 3))


# -- determinism -----------------------------------------------------------------------------------
def test_indicators_are_reproducible_from_the_seed_and_leave_the_rng_alone():
    def factory():
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

    x = torch.randn(12, 6)
    state = torch.get_rng_state()
    a = indicators(factory, x, seed=5, repeats=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = indicators(factory, x, seed=5, repeats=3)
    c = indicators(factory, x, seed=6, repeats=3)
    assert a == b
    assert a["per_init"] != c["per_init"] and a["condition_number"] != c["condition_number"]
    assert len({r["condition_number"] for r in a["per_init"]}) == 3  # three distinct initialisations
    assert a["log_condition_number"] == pytest.approx(sum(math.log(r["condition_number"]) for r in a["per_init"]) / 3)
    assert a["regions"] == pytest.approx(sum(r["regions"] for r in a["per_init"]) / 3)
    assert (a["ntk_batch"], a["region_samples"], a["relu_units"]) == (12, 12, 32)
    with pytest.raises(ConfigError, match="not a model"):
        indicators(factory(), x)


# -- ranking ---------------------------------------------------------------------------------------
def test_rank_architectures_sums_the_two_rankings():
    rows = [
        {"label": "a", "condition_number": 10.0, "regions": 50},
        {"label": "b", "condition_number": 100.0, "regions": 90},
        {"label": "c", "condition_number": math.inf, "regions": 90},
        {"label": "d", "condition_number": 5.0, "regions": 10},
    ]
    ranked = rank_architectures(rows)
    assert [r["label"] for r in ranked] == ["a", "b", "c", "d"]  # order kept, inputs copied
    assert [r["trainability_rank"] for r in ranked] == [2, 3, 4, 1]
    assert [r["expressivity_rank"] for r in ranked] == [3, 1.5, 1.5, 4]  # tie shares 1 and 2
    assert [r["tenas_rank"] for r in ranked] == [5, 4.5, 5.5, 5]
    assert "tenas_rank" not in rows[0]
    with pytest.raises(ConfigError, match="lack 'regions'"):
        rank_architectures([{"condition_number": 1.0}])


# -- configs ---------------------------------------------------------------------------------------
def test_bad_architectures_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="known kinds: mlp, cnn"):
        Architecture(kind="resnet")
    with pytest.raises(ConfigError, match="no ReLU"):
        Architecture(kind="mlp")
    with pytest.raises(ConfigError, match="listed more than once"):
        load_indicators_config(None, {"architectures": [{"hidden": [8]}, {"hidden": [8]}]})
    with pytest.raises(ConfigError, match="at most 3 conv entries"):
        build_candidate(Architecture(kind="cnn", channels=(2, 2, 2, 2)), in_channels=1, image_size=8, num_classes=10)


def test_the_shipped_config_has_a_mixed_family_that_builds():
    path = Path(__file__).parent.parent / "configs" / "indicators_mnist.yaml"
    config = load_indicators_config(path)
    archs = config.architectures
    assert len(archs) >= 24 and config.data.dataset == "mnist"
    mlps = [a for a in archs if a.kind == "mlp"]
    assert {len(a.hidden) for a in mlps} == {1, 2, 3, 4} and sum(a.kind == "cnn" for a in archs) >= 5
    assert min(min(a.hidden) for a in mlps) == 8 and max(max(a.hidden) for a in mlps) == 512
    for arch in archs:
        model = build_candidate(arch, in_channels=1, image_size=28, num_classes=10)
        assert any(isinstance(m, nn.ReLU) for m in model.modules())


# -- the experiment --------------------------------------------------------------------------------
BASE = {
    "name": "ind",
    "device": "cpu",
    "data": {"dataset": "digits", "batch_size": 32, "eval_batch_size": 512},
    "indicators": {"ntk_batch": 16, "region_samples": 200, "repeats": 2},
    "train": {"epochs": 2, "optimizer": {"name": "adam", "lr": 1e-2}},
    "architectures": [{"kind": "mlp", "hidden": [4]}, {"kind": "mlp", "hidden": [32, 16]},
                      {"kind": "cnn", "channels": [4], "hidden": [16]}],
}


@pytest.fixture(scope="module")
def digits():
    full = load_dataset("digits")
    return dataclasses.replace(full, train_images=full.train_images[:512], train_labels=full.train_labels[:512])


def study(root, digits, echo=lambda s: None):
    config = load_indicators_config(None, copy.deepcopy(BASE))
    run = RunDir.for_config(config, root)
    return run, run_indicators(config, run, progress=False, echo=echo, dataset=digits)


@pytest.fixture(scope="module")
def clean(tmp_path_factory, digits):
    return study(tmp_path_factory.mktemp("clean"), digits)


def test_the_study_measures_trains_and_correlates_every_architecture(clean):
    run, results = clean
    rows = results["architectures"]
    assert results["complete"] and [r["label"] for r in rows] == ["mlp-4", "mlp-32-16", "cnn-4-fc-16"]
    for r in rows:
        assert 0.0 < r["test_acc"] <= 1.0 and len(r["per_init"]) == 2 and r["region_samples"] == 200
        assert 1 <= r["regions"] <= 200 and r["log_condition_number"] > 0
        assert run.checkpoint(f"{r['label']}-seed-0").is_file()
    assert rows[0]["parameters"] == 64 * 4 + 4 + 4 * 10 + 10
    assert rows[1]["test_acc"] > 0.6  # trained, not just measured
    assert sum(r["trainability_rank"] for r in rows) == 6
    assert all(r["tenas_rank"] == r["trainability_rank"] + r["expressivity_rank"] for r in rows)
    assert set(results["tau"]) == {"trainability", "expressivity", "tenas", "parameters"}
    for t in results["tau"].values():
        assert t["n"] == 3 and (t["tau"] is None or -1 <= t["tau"] <= 1)
    # accuracy orders mlp-4 last; parameters agree with that ordering iff tau is positive
    accs = [r["test_acc"] for r in rows]
    assert results["tau"]["parameters"]["tau"] == pytest.approx(_tau(accs, [r["parameters"] for r in rows]))
    assert (run.path / "indicators.png").stat().st_size > 1000
    table = (run.path / "indicators.md").read_text()
    assert "| mlp-32-16 |" in table and "Kendall tau" in table and "INCOMPLETE" not in table
    assert format_indicators(results) == table


def _tau(a, b):
    """Kendall tau-a of two tie-free sequences, by counting pairs."""
    pairs = [(i, j) for i in range(len(a)) for j in range(i + 1, len(a))]
    return sum(1 if (a[i] - a[j]) * (b[i] - b[j]) > 0 else -1 for i, j in pairs) / len(pairs)


def test_an_interrupted_study_resumes_without_retraining_a_finished_architecture(clean, tmp_path, monkeypatch, digits):
    original_log = RunDir.log

    def interrupting_log(self, record):
        original_log(self, record)
        if (record["phase"], record["epoch"]) == ("mlp-32-16-seed-0", 1):
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "log", interrupting_log)
    with pytest.raises(KeyboardInterrupt):
        study(tmp_path, digits)
    monkeypatch.setattr(RunDir, "log", original_log)
    run = RunDir.for_config(load_indicators_config(None, copy.deepcopy(BASE)), tmp_path)
    partial = run.results()
    assert not partial["complete"] and [r["label"] for r in partial["architectures"]] == ["mlp-4"]
    finished = run.checkpoint("mlp-4-seed-0").stat().st_mtime_ns
    said = []
    _, resumed = study(tmp_path, digits, echo=said.append)
    assert "resumed mlp-32-16-seed-0 at epoch 1/2" in said
    assert not any(s.startswith("[1/3]") for s in said)  # mlp-4 was neither measured nor trained again
    assert run.checkpoint("mlp-4-seed-0").stat().st_mtime_ns == finished
    logged = [(r["phase"], r["epoch"]) for r in map(json.loads, run.metrics_path.read_text().splitlines())]
    assert len(logged) == len(set(logged)) == 6  # 3 architectures x 2 epochs, none trained twice
    assert resumed["architectures"] == clean[1]["architectures"] and resumed["tau"] == clean[1]["tau"]
    said = []
    assert run_indicators(load_indicators_config(None, copy.deepcopy(BASE)), run, echo=said.append) == resumed
    assert said == [f"reusing finished run {run.path}"]
