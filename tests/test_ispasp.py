"""i-SpaSP (Wolfe, Wang & Kyrillidis, 2022): structured selection by the residual of the pruned
layer outputs on data, used where L1 / Taylor are (prune_channels, prune_to_flops, the
`secateurs structured` experiment)."""
import copy
import dataclasses
import itertools

import pytest
import torch
import torch.nn as nn

from secateurs.data import load_dataset
from secateurs.errors import ConfigError
from secateurs.experiments.runs import RunDir
from secateurs.experiments.structured import load_structured_config, run_structured
from secateurs.models import MLP
from secateurs.structured import (
    ISpaSP, build_graph, ispasp_select, l1_importance, model_cost, prune_channels, prune_to_flops, remove_units,
)


def decoy_net(seed=0, orthogonal=False):
    """10 -> 12 -> 6 ReLU net. Hidden units 0-5 carry the output; 6-8 have 10x larger incoming
    weights but zero outgoing weights; 9-11 have 10x larger incoming weights and a bias that keeps
    them at zero on the data (dead ReLUs). L1 (incoming filter norm) ranks 6-11 highest."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 6))
    with torch.no_grad():
        net[0].weight[:6] = torch.rand(6, 10) * 0.2 + 0.05  # positive: active on positive inputs
        net[0].bias[:6] = 0.0
        net[0].weight[6:] = torch.rand(6, 10) * 2 + 1.0
        net[0].bias[6:9] = 0.0
        net[0].bias[9:] = -1e3
        net[2].weight[:, 6:] = 0.0
        if orthogonal:  # unit i writes only output i, with distinct strengths
            net[2].weight[:, :6] = torch.diag(torch.tensor([3.0, 0.5, 2.0, 1.0, 4.0, 0.25]))
    x = torch.rand(256, 10)  # positive inputs
    return net, x


def residual(net, x, kept):
    with torch.no_grad():
        h = torch.relu(net[0](x))
        mask = torch.zeros(h.shape[1])
        mask[list(kept)] = 1.0
        return float(((net[2](h) - net[2](h * mask)) ** 2).sum())


def top_l1(net, graph, s):
    return sorted(torch.argsort(l1_importance(net, graph)["0"], descending=True)[:s].tolist())


def test_keeps_exactly_the_informative_neurons_where_l1_keeps_the_decoys():
    net, x = decoy_net()
    graph = build_graph(net, x[:2])
    sel = ispasp_select(net, graph, [(x[:128], None), (x[128:], None)], {"0": 6})
    assert sel.kept["0"] == [0, 1, 2, 3, 4, 5]
    assert top_l1(net, graph, 6) == [6, 7, 8, 9, 10, 11]  # the case is built so that L1 picks wrongly
    assert residual(net, x, sel.kept["0"]) < 1e-8 < residual(net, x, top_l1(net, graph, 6))
    # through the library's removal: a 6-unit network computing exactly the dense output
    small = prune_channels(net, x[:2], 0.5, importance=ISpaSP([(x, None)]))
    assert small[0].out_features == 6
    torch.testing.assert_close(small(x), net(x), rtol=1e-5, atol=1e-5)


def test_selection_equals_the_brute_force_best_subset_and_the_residual_falls():
    net, x = decoy_net(1, orthogonal=True)
    graph = build_graph(net, x[:2])
    for s in (1, 2, 3, 4):
        sel = ispasp_select(net, graph, [(x, None)], {"0": s})
        best = min(itertools.combinations(range(12), s), key=lambda c: residual(net, x, c))
        assert sel.kept["0"] == sorted(best), s
        history = sel.history["0"]
        assert history[0] == pytest.approx(residual(net, x, []), rel=1e-6)  # the empty set's
        assert min(history) == pytest.approx(residual(net, x, sel.kept["0"]), rel=1e-6, abs=1e-9)
        assert min(history) < history[0]
        assert residual(net, x, sel.kept["0"]) < residual(net, x, top_l1(net, graph, s))


def test_a_cancelling_pair_raises_the_residual_and_the_best_iterate_is_returned():
    """A known weakness of thresholding by contribution size (the authors' code thresholds by
    activation size, with the same effect): units 4 and 5 are large and cancel each other. Once
    a set is chosen, the residual correlates with one of them, the pair enters the merged set and
    survives the size threshold, and the residual rises. The selection is the best iterate."""
    net = nn.Sequential(nn.Linear(3, 7), nn.ReLU(), nn.Linear(7, 2, bias=False))
    with torch.no_grad():
        net[0].weight.fill_(0.0)
        net[0].weight[:, 0] = 1.0
        net[0].bias.zero_()
        w = torch.zeros(2, 7)
        w[0, :4] = torch.tensor([1.0, 1.1, 1.2, 1.3])
        w[1, 4], w[1, 5], w[1, 6] = 2.0, -2.0, 1.5
        net[2].weight.copy_(w)
    x = torch.rand(64, 3, generator=torch.Generator().manual_seed(0)) + 0.5
    graph = build_graph(net, x[:2])
    sel = ispasp_select(net, graph, [(x, None)], {"0": 2})
    history = sel.history["0"]
    assert history[2] > history[1]  # not monotone
    assert residual(net, x, sel.kept["0"]) == pytest.approx(min(history), rel=1e-6)
    assert 4 not in sel.kept["0"] and 5 not in sel.kept["0"]


def test_multilayer_counts_run_and_match_the_masked_dense_model():
    torch.manual_seed(0)
    model = MLP(20, (16, 8), 3).eval()
    x = torch.randn(96, 20)
    batches = [(x[:48], None), (x[48:], None)]
    importance = ISpaSP(batches, iterations=10)
    small = prune_channels(model, x[:2], 0.5, importance=importance)
    assert [small.net[1].out_features, small.net[3].out_features] == [8, 4]
    kept = importance.last.kept
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for consumer, group, units in ((masked.net[3], "net.1", 16), (masked.net[5], "net.3", 8)):
            gone = [u for u in range(units) if u not in kept[group]]
            consumer.weight[:, gone] = 0.0
    torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-5)
    # layer by layer: the second layer is chosen on the first layer's pruned output, exactly
    # as if the first layer's units were already removed
    graph = build_graph(model, x[:2])
    first_only = remove_units(model, graph, {"net.1": [u for u in range(16) if u not in kept["net.1"]]})
    again = ispasp_select(first_only, build_graph(first_only, x[:2]), batches, {"net.3": 4}, iterations=10)
    assert again.kept["net.3"] == kept["net.3"]
    # and to a FLOPs target, through the same bisection as L1
    pruned, _ = prune_to_flops(model, x[:2], 0.5, importance=importance)
    removed = 1 - model_cost(pruned, x[:2]).macs / model_cost(model, x[:2]).macs
    assert abs(removed - 0.5) < 0.05


def test_without_data_it_is_refused_naming_the_fix():
    model = MLP(20, (16,), 3)
    x = torch.randn(4, 20)
    with pytest.raises(ConfigError, match=r"needs batches: pass importance=ISpaSP\(batches\)"):
        ISpaSP()
    with pytest.raises(ConfigError, match=r"'ispasp' needs data: pass importance=ISpaSP\(batches\)"):
        prune_channels(model, x, 0.5, importance="ispasp")
    with pytest.raises(ConfigError, match="empty iterable of batches"):
        ISpaSP([])
    with pytest.raises(ConfigError, match="scope='uniform'"):
        prune_channels(model, x, 0.5, importance=ISpaSP([(x, None)]), scope="global")
    with pytest.raises(ConfigError, match="structured.scope: uniform"):
        load_structured_config(None, {"structured": {"importance": "ispasp", "scope": "global"}})


def test_the_structured_experiment_runs_ispasp_on_a_conv_net(tmp_path):
    full = load_dataset("digits")
    digits = dataclasses.replace(full, train_images=full.train_images[:256], train_labels=full.train_labels[:256])
    config = load_structured_config(None, {
        "name": "isp", "data": {"dataset": "digits", "batch_size": 64, "eval_batch_size": 512},
        "model": {"name": "conv2"}, "train": {"epochs": 1, "optimizer": {"name": "adam", "lr": 2e-3}},
        "finetune": {"epochs": 1, "optimizer": {"name": "adam", "lr": 5e-4}},
        "structured": {"flops_removed": [0.5], "importance": "ispasp", "taylor_batches": 2,
                       "ispasp_iterations": 5, "latency_repeats": 0},
    })
    results = run_structured(config, RunDir.for_config(config, tmp_path), progress=False, echo=lambda s: None,
                             dataset=digits)
    (level,) = results["levels"]
    assert results["importance"] == "ispasp" and abs(level["flops_removed"] - 0.5) < 0.05
    assert level["macs"] < results["dense"]["macs"]


def test_consumers_are_read_by_layer_role_not_class():
    # (input feature axis, input features, weight axis indexing them), from the layer registry:
    # transformers' Conv1D stores its weight [in, out], so its inputs index weight axis 0
    from transformers.pytorch_utils import Conv1D

    from secateurs.structured.ispasp import _layout

    assert _layout(nn.Linear(12, 6)) == (-1, 12, 1)
    assert _layout(Conv1D(6, 12)) == (-1, 12, 0)
    assert _layout(nn.Conv2d(12, 6, 3)) == (1, 12, 1)
    with pytest.raises(ConfigError, match="groups=3"):
        _layout(nn.Conv2d(12, 6, 3, groups=3), "dw")


def test_an_unregistered_consumer_is_refused_with_the_fix():
    from secateurs.structured.ispasp import _layout

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

    with pytest.raises(ConfigError, match="register it with secateurs.layers.register_layer"):
        _layout(Scale(), "scale")
