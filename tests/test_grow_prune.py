"""Grow-and-prune architecture search: exact deepening, the limits, which units are pruned,
determinism, and the experiment's resume after an interruption."""
import copy
import dataclasses
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from secateurs.data import load_dataset
from secateurs.errors import ConfigError
from secateurs.experiments.grow_prune import load_grow_prune_config, run_grow_prune
from secateurs.experiments.runs import RunDir
from secateurs.grow.deepen import insert_identity_layer, mlp_layout
from secateurs.grow.heuristic import (
    GrowPrune, GrowPruneConfig, deepen_site, lowest_units, mlp_parameters, unit_usefulness,
)
from secateurs.models import MLP


def params(model):
    return sum(p.numel() for p in model.parameters())


def data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(10, (n,), generator=g)


def batches():
    x, y = data()
    return [(x[:32], y[:32]), (x[32:], y[32:])]


# -- deepening ------------------------------------------------------------------------------------
@pytest.mark.parametrize("after", [0, 1])
def test_an_identity_layer_leaves_the_output_exactly_unchanged(after):
    model = MLP(64, [12, 7], 10)
    x, _ = data()
    original = copy.deepcopy(model.state_dict())
    deeper = insert_identity_layer(model, after, example_input=x[:1])
    assert torch.equal(deeper(x), model(x))
    widths = [12, 7]
    widths.insert(after + 1, widths[after])
    assert list(mlp_layout(deeper).widths) == widths
    # the same state-dict layout as a fresh MLP of the new widths, so a resumed run can rebuild it
    fresh = MLP(64, widths, 10).state_dict()
    assert {k: v.shape for k, v in deeper.state_dict().items()} == {k: v.shape for k, v in fresh.items()}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())  # original untouched
    # the deeper network trains: the new layer gets a gradient
    F.cross_entropy(deeper(x), data()[1]).backward()
    assert deeper.net[2 * after + 3].weight.grad.abs().sum() > 0


def test_deepening_refuses_what_it_cannot_do_exactly():
    with pytest.raises(ConfigError, match="index of a hidden layer, 0..1"):
        insert_identity_layer(MLP(64, [12, 7], 10), 2)
    tanh = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))
    with pytest.raises(ConfigError, match="Linear, ReLU, ..., Linear"):
        insert_identity_layer(tanh, 0)


# -- the rules ------------------------------------------------------------------------------------
def test_pruning_plan_takes_exactly_the_lowest_scores_above_the_floor():
    scores = [torch.tensor([0.5, 0.1, 0.9, 0.2]), torch.tensor([0.3, 0.05, 0.1])]
    # lowest four: (1,1)=0.05, (0,1)=0.1, (1,2)=0.1 (tie: earlier layer first), (0,3)=0.2
    assert lowest_units(scores, 4, min_width=1) == [[1, 3], [1, 2]]
    # layer 1 may lose one unit only: (1,2) is skipped and (0,3) takes its place
    assert lowest_units(scores, 3, min_width=2) == [[1, 3], [1]]
    assert lowest_units(scores, 10, min_width=2) == [[1, 3], [1]]  # the floors stop it at 3


def test_the_depth_rule_needs_every_layer_saturated_and_picks_the_widest():
    # thresholds 0.1 * (64 + 12) = 7.6 for layer 0, 0.1 * (w_0 + 10) for layer 1
    assert deepen_site(64, [7, 12], 10, 0.1) is None  # layer 0: 7 < 7.6
    assert deepen_site(64, [8, 12], 10, 0.1) == 1
    assert deepen_site(64, [30, 3], 10, 0.1) is None  # layer 1: 3 < 0.1 * (30 + 10)
    assert deepen_site(64, [12, 12], 10, 0.1) == 0  # ties: the first


def test_the_taylor_usefulness_is_activation_times_gradient():
    model = MLP(64, [12, 7], 10)
    with torch.no_grad():
        model.net[3].weight[:, 4] = 0  # unit 4 of the first hidden layer is not read
    scores = unit_usefulness(model, "taylor", batches=batches())
    assert scores[0][4] == 0 and (scores[0] > 0).sum() >= 8
    # a * dL/da summed over a batch equals the sum of g * w over the unit's outgoing weights
    expected = [torch.zeros(12, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)]
    for x, y in batches():
        g = torch.autograd.grad(F.cross_entropy(model(x), y), [model.net[3].weight, model.net[5].weight])
        for e, gw, w in zip(expected, g, (model.net[3].weight, model.net[5].weight)):
            e += (gw * w).sum(0).abs().double()
    for s, e in zip(scores, expected):
        torch.testing.assert_close(s.double(), e / 2, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("usefulness", ["norm", "taylor"])
def test_an_event_prunes_exactly_the_least_useful_units(usefulness):
    model = MLP(64, [12, 7], 10)
    weak = {0: [1, 5], 1: [2]}
    with torch.no_grad():  # these units are not read (score 0); a positive bias keeps the rest alive
        model.net[3].weight[:, weak[0]] = 0
        model.net[5].weight[:, weak[1]] = 0
        model.net[1].bias.fill_(1.0)
        model.net[3].bias.fill_(1.0)
    search = GrowPrune(GrowPruneConfig(max_params=10_000, add=0, prune=3, usefulness=usefulness, depth_ratio=10.0),
                       example_input=data()[0][:1])
    scores = search.scores(model, batches())
    assert [[u for u in range(len(s)) if s[u] == 0] for s in scores] == [weak[0], weak[1]]
    pruned, record = search.event(model, batches())
    assert record["pruned"] == [2, 1] and record["widths"] == [10, 6] and record["deepen"] == "not saturated"
    kept0 = [u for u in range(12) if u not in weak[0]]
    kept1 = [u for u in range(7) if u not in weak[1]]
    assert torch.equal(pruned.net[1].weight, model.net[1].weight[kept0])
    assert torch.equal(pruned.net[3].weight, model.net[3].weight[kept1][:, kept0])
    assert torch.equal(pruned.net[5].weight, model.net[5].weight[:, kept1])


def test_events_never_exceed_the_limits_and_use_the_budget():
    config = GrowPruneConfig(max_params=3_500, max_depth=3, min_width=2, add=16, prune=4, usefulness="norm",
                             depth_ratio=0.05)
    search = GrowPrune(config, example_input=data()[0][:1])
    model, depths = MLP(64, [6], 10), []
    for _ in range(8):
        model, record = search.event(model)
        layout = mlp_layout(model)
        assert record["params"] == params(model) == mlp_parameters(64, layout.widths, 10) <= 3_500
        assert record["depth"] == layout.depth <= 3
        if sum(record["added"]) < 16:  # growth stopped early: not even the cheapest unit still fits
            cheapest = min(a + 1 + b for a, b in zip([64, *layout.widths], [*layout.widths[1:], 10]))
            assert params(model) + cheapest > 3_500
        depths.append(layout.depth)
    assert depths[-1] == 3 and "inserted" in [r["deepen"] for r in search.history]
    assert any(sum(r["added"]) < 16 for r in search.history)  # the budget was reached


def test_a_start_beyond_the_limits_is_refused():
    search = GrowPrune(GrowPruneConfig(max_params=1_000, max_depth=1), example_input=data()[0][:1])
    with pytest.raises(ConfigError, match="already has 1210 parameters, above max_params=1000"):
        search.event(MLP(64, [16], 10))
    with pytest.raises(ConfigError, match="already has 2 hidden layers, above max_depth=1"):
        search.event(MLP(64, [4, 4], 10))


def test_the_search_is_deterministic_given_the_seed_and_resumes_exactly():
    def run(seed, events=3, state=None, model=None):
        search = GrowPrune(GrowPruneConfig(max_params=4_000, add=9, prune=2, seed=seed, depth_ratio=0.1),
                           example_input=data()[0][:1])
        if state is not None:
            search.load_state_dict(state)
        if model is None:
            torch.manual_seed(0)
            model = MLP(64, [8], 10)
        for _ in range(events):
            model, _ = search.event(model, batches())
        return model, search

    a, sa = run(3)
    b, sb = run(3)
    assert sa.history == sb.history
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    c, sc = run(4)
    assert sc.history != sa.history or not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    # two events; then MLP(widths) + weights + the search state, as the experiment resumes
    half, sh = run(3, events=2)
    rebuilt = MLP(64, mlp_layout(half).widths, 10)
    rebuilt.load_state_dict(half.state_dict())
    resumed, sr = run(3, events=1, state=copy.deepcopy(sh.state_dict()), model=rebuilt)
    assert sr.history == sa.history
    assert all(torch.equal(p, q) for p, q in zip(resumed.state_dict().values(), a.state_dict().values()))


@pytest.mark.parametrize("bad, match", [
    ({"usefulness": "l1"}, "known: taylor, norm"),
    ({"prune": -1}, "prune must be an integer >= 0"),
    ({"add": 0, "prune": 0}, "both 0"),
    ({"depth_ratio": 0}, "depth_ratio must be a finite number > 0"),
    ({"max_params": 0}, "max_params must be an integer >= 1"),
    ({"min_width": 0}, "min_width must be an integer >= 1"),
])
def test_bad_meta_parameters_name_the_fix(bad, match):
    with pytest.raises(ConfigError, match=match):
        GrowPruneConfig(**bad)
    with pytest.raises(ConfigError, match=match):
        load_grow_prune_config(None, {"grow_prune": bad})


def test_bad_experiment_settings_name_the_fix():
    with pytest.raises(ConfigError, match="start has 3 hidden layers but grow_prune.max_depth is 2"):
        load_grow_prune_config(None, {"start": [8, 8, 8], "grow_prune": {"max_depth": 2}})
    with pytest.raises(ConfigError, match="set seed instead"):
        load_grow_prune_config(None, {"grow_prune": {"seed": 3}})
    with pytest.raises(ConfigError, match="cycles must be an integer >= 1"):
        load_grow_prune_config(None, {"cycles": 0})
    with pytest.raises(ConfigError, match="known keys under grow_prune"):
        load_grow_prune_config(None, {"grow_prune": {"max_parameters": 10}})


# -- the experiment -------------------------------------------------------------------------------
BASE = {
    "name": "gp", "device": "cpu",
    "data": {"dataset": "digits", "batch_size": 64, "eval_batch_size": 512, "validation": 128},
    "start": [8], "cycles": 4,
    "train": {"epochs": 2, "optimizer": {"name": "adam", "lr": 3e-3}},
    "grow_prune": {"max_params": 2_600, "max_depth": 3, "min_width": 2, "add": 12, "prune": 4,
                   "usefulness_batches": 2, "depth_ratio": 0.1},
}


@pytest.fixture(scope="module")
def digits():
    full = load_dataset("digits")  # 640 of the 1437 training images keep the runs short
    return dataclasses.replace(full, train_images=full.train_images[:640], train_labels=full.train_labels[:640])


def search(root, digits, data=None, echo=lambda s: None):
    config = load_grow_prune_config(None, copy.deepcopy(data or BASE))
    run = RunDir.for_config(config, root)
    return config, run, run_grow_prune(config, run, progress=False, echo=echo, dataset=digits)


@pytest.fixture(scope="module")
def clean(tmp_path_factory, digits):
    return search(tmp_path_factory.mktemp("clean"), digits)


def test_the_search_records_its_path_and_the_baselines(clean):
    config, run, results = clean
    assert results["complete"] and [r["cycle"] for r in results["path"]] == [1, 2, 3, 4]
    assert results["total_epochs"] == 8 and results["in_features"] == 64
    rows = results["path"]
    assert rows[0]["widths"] == [8] and rows[-1]["event"] is None
    for row, after in zip(rows, rows[1:]):
        assert row["event"]["widths"] == after["widths"] and row["event"]["params"] == after["params"]
        assert row["params"] <= 2_600 and row["depth"] <= 3
    final, fixed, reference = results["final"], results["baselines"]["fixed"], results["baselines"]["reference"]
    assert final["widths"] == rows[-1]["widths"] == fixed["widths"] and fixed["params"] == final["params"]
    assert reference["model"] == "lenet300_100" and reference["params"] == mlp_parameters(64, [300, 100], 10)
    assert all(0 <= r["test_acc"] <= 1 and 0 <= r["val_acc"] <= 1 for r in (*rows, fixed, reference))
    assert (run.path / "grow_prune.png").stat().st_size > 0
    table = (run.path / "grow_prune.md").read_text()
    assert "| same widths, from scratch |" in table and "| lenet300_100, from scratch |" in table


def test_an_interrupted_search_resumes_without_repeating_finished_cycles(clean, tmp_path, monkeypatch, digits):
    original_log = RunDir.log

    def interrupting_log(self, record):
        original_log(self, record)
        if (record["phase"], record["epoch"]) == ("cycle-3", 1):  # after two events, mid-cycle
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "log", interrupting_log)
    with pytest.raises(KeyboardInterrupt):
        search(tmp_path, digits)
    monkeypatch.setattr(RunDir, "log", original_log)
    said = []
    _, run, resumed = search(tmp_path, digits, echo=said.append)
    assert any(s.startswith("restored the search after event 2") for s in said)
    assert "resumed cycle-3 at epoch 1/2" in said
    logged = [(r["phase"], r["epoch"]) for r in map(json.loads, run.metrics_path.read_text().splitlines())]
    assert len(logged) == len(set(logged))  # no epoch trained twice
    assert ("cycle-1", 1) in logged and ("reference", 8) in logged
    assert resumed["path"] == clean[2]["path"]
    assert resumed["final"] == clean[2]["final"] and resumed["baselines"] == clean[2]["baselines"]


def test_a_finished_search_is_reused_and_a_start_over_budget_is_refused(clean, digits, tmp_path):
    config, run, results = clean
    said = []
    assert run_grow_prune(config, run, progress=False, echo=said.append, dataset=digits) == results
    assert said == [f"reusing finished run {run.path}"]
    over = {**BASE, "start": [40]}  # 64*40 + 40 + 40*10 + 10 = 3010 parameters
    with pytest.raises(ConfigError, match="has 3010 parameters, above grow_prune.max_params=2600"):
        search(tmp_path, digits, over)
