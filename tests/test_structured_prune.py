"""Physical channel removal: lossless compaction, ratio pruning, importance, export."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from secateurs.errors import ConfigError, UnknownNameError
from secateurs.models import CifarResNet, create_model
from secateurs.structured import (
    build_graph, compact_zero_channels, l1_importance, load_compact, model_cost, plan_removal,
    prune_channels, prune_to_flops, save_compact, taylor_importance, zero_units,
)
from test_structured_graph import CatNet, DepthwiseNet

FAMILIES = {
    "lenet5": (lambda: create_model("lenet5"), (1, 1, 28, 28)),
    "lenet300_100": (lambda: create_model("lenet300_100"), (1, 1, 28, 28)),
    "conv4": (lambda: create_model("conv4", in_channels=3, image_size=32), (1, 3, 32, 32)),
    "vgg11": (lambda: create_model("vgg11", in_channels=3, image_size=32), (1, 3, 32, 32)),
    "resnet20_A": (lambda: CifarResNet(20), (1, 3, 32, 32)),
    "resnet20_B": (lambda: CifarResNet(20, shortcut="B"), (1, 3, 32, 32)),
    "resnet18": (lambda: create_model("resnet18", num_classes=10, in_channels=3, image_size=64), (1, 3, 64, 64)),
    "concat": (CatNet, (1, 3, 32, 32)),
    "depthwise": (DepthwiseNet, (1, 3, 32, 32)),
}


def randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine, so a wrongly sliced BN changes the output."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


def predicted_parameters(model: nn.Module, graph, plan) -> int:
    """Parameter count after removing ``plan``, from layer shapes (independent of rebuild)."""
    cut: dict[tuple[str, str], set[int]] = {}
    for name, units in plan.items():
        for s in graph.group(name).slices:
            cut.setdefault((s.module, s.role), set()).update(i for u in units for i in s.indices[u])
    total = 0
    for name, m in model.named_modules():
        gone = lambda role: len(cut.get((name, role), ()))  # noqa: E731
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            out = m.weight.shape[0] - gone("out") - gone("depthwise")
            fan_in = m.weight.shape[1] - gone("in")
            total += out * fan_in * math.prod(m.weight.shape[2:]) + (out if m.bias is not None else 0)
        elif isinstance(m, nn.BatchNorm2d):
            total += 2 * (m.num_features - gone("bn"))
        elif isinstance(m, nn.LayerNorm):
            total += 2 * (m.normalized_shape[0] - gone("ln"))
        else:  # a module's own per-channel parameters (role "param:<attr>:<dim>") shrink along <dim>
            for attr, p in m.named_parameters(recurse=False):
                roles = [r for (mod, r) in cut if mod == name and r.startswith(f"param:{attr}:")]
                per_index = p.numel() // p.shape[int(roles[0].rsplit(":", 1)[1])] if roles else 0
                total += p.numel() - sum(gone(r) for r in roles) * per_index
    return total


def zero_channels_(model: nn.Module, group, units) -> None:
    """Kill channels the way a channel mask would: producer filters, biases and BN affine."""
    with torch.no_grad():
        for s in group.slices:
            if s.role == "in" or s.role.startswith("param:"):  # consumers; per-channel scales of a dead channel
                continue
            m = model.get_submodule(s.module)
            for u in units:
                for p in (m.weight, m.bias):
                    if p is not None and s.indices[u]:
                        p[list(s.indices[u])] = 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_compacting_dead_channels_keeps_outputs(family):
    factory, shape = FAMILIES[family]
    model = randomise_bn(factory()).double().eval()
    x = torch.randn(shape, dtype=torch.float64)
    graph = build_graph(model, x)
    biggest = max(graph.prunable, key=lambda g: g.units)
    chosen = {g.name: sorted({0, g.units // 3, g.units - 1}) for g in (graph.prunable[0], biggest)}
    for name, units in chosen.items():
        zero_channels_(model, graph.group(name), units)
    assert zero_units(model, graph) == chosen
    small = compact_zero_channels(model, x)
    assert sum(p.numel() for p in small.parameters()) == predicted_parameters(model, graph, chosen)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(small(x), model(x), atol=1e-6, rtol=0)
    x2 = torch.randn((3, *shape[1:]), dtype=torch.float64)
    torch.testing.assert_close(small(x2), model(x2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_half_ratio_gives_a_runnable_model_of_predicted_size(family):
    factory, shape = FAMILIES[family]
    model, x = factory().eval(), torch.randn(shape)
    graph = build_graph(model, x)
    plan = plan_removal(graph, l1_importance(model, graph), 0.5)
    assert all(len(plan[g.name]) == g.units // 2 for g in graph.prunable if g.units > 1)
    small = prune_channels(model, x, 0.5)
    assert sum(p.numel() for p in small.parameters()) == predicted_parameters(model, graph, plan)
    assert small(torch.randn((2, *shape[1:]))).shape == (2, model(x).shape[1])
    assert model_cost(small, x).macs <= 0.5 * model_cost(model, x).macs  # input layers keep fan-in


def test_lenet5_hand_counted_removal():
    model, x = create_model("lenet5"), torch.randn(1, 1, 28, 28)
    small = prune_channels(model, x, {"features.0": 5, "features.3": 10})
    # conv1: 5 x (25 + 1); conv2: 10 x (20*25 + 1) outputs and 5 x 50*25 inputs (of the 50);
    # fc: 10 channels x 16 positions x 500 inputs
    removed = 5 * 26 + 10 * (20 * 25 + 1) + 5 * 40 * 25 + 10 * 16 * 500
    assert sum(p.numel() for p in small.parameters()) == 431080 - removed
    assert small.features[0].out_channels == 15 and small.classifier[1].in_features == 40 * 16


def test_residual_stream_is_pruned_identically_everywhere():
    model, x = CifarResNet(20).eval(), torch.randn(1, 3, 32, 32)
    graph = build_graph(model, x)
    removed = [1, 5, 20, 40]  # shared by all stages, shared by all, stage 2+3 (pad part), stage 3
    small = prune_channels(model, x, {"conv1": len(removed)}, importance={
        **{g.name: torch.ones(g.units) for g in graph.prunable},
        "conv1": torch.tensor([0.0 if u in removed else 1.0 for u in range(64)]),
    })
    assert small.conv1.out_channels == 14 and small.bn1.num_features == 14
    for block in small.layer1:
        assert block.conv2.out_channels == 14 and block.conv1.in_channels == 14
    for block in small.layer2:
        assert block.conv2.out_channels == 29
    assert small.layer3[0].conv2.out_channels == 60 and small.fc.in_features == 60
    keep = [u for u in range(16) if u not in removed]
    torch.testing.assert_close(small.conv1.weight, model.conv1.weight[keep])
    torch.testing.assert_close(small.layer2[2].bn2.running_var, model.layer2[2].bn2.running_var[[u for u in range(32) if u not in removed]])
    assert small(x).shape == (1, 10)
    assert isinstance(small, CifarResNet)


def test_excluded_layers_are_untouched():
    model, x = create_model("vgg11", in_channels=3, image_size=32).eval(), torch.randn(1, 3, 32, 32)
    small = prune_channels(model, x, 0.5, exclude=["features.4", "features.5"])
    assert small.features[4] is not model.features[4]  # a copy ...
    torch.testing.assert_close(small.features[4].weight, model.features[4].weight)  # ... unchanged
    assert small.features[0].out_channels == 64  # feeds the excluded conv
    assert small.features[8].in_channels == 128 and small.features[8].out_channels == 128


def test_ratio_never_empties_a_group_and_explicit_emptying_raises():
    model, x = create_model("lenet300_100"), torch.randn(1, 1, 28, 28)
    small = prune_channels(model, x, 0.999, min_channels=3)
    assert small.net[1].out_features == 3 and small.net[3].out_features == 3
    with pytest.raises(ConfigError, match="disconnect"):
        prune_channels(model, x, {"net.1": 300})
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        prune_channels(model, x, 1.0)
    with pytest.raises(ConfigError, match="cannot be pruned"):
        prune_channels(model, x, {"net.5": 1})
    with pytest.raises(UnknownNameError, match="l1"):
        prune_channels(model, x, 0.5, importance="l2")


def test_global_scope_removes_the_requested_share_overall():
    model, x = create_model("conv4", in_channels=3, image_size=32), torch.randn(1, 3, 32, 32)
    graph = build_graph(model, x)
    plan = plan_removal(graph, l1_importance(model, graph), 0.3, scope="global")
    total = sum(g.units for g in graph.prunable)
    assert sum(len(v) for v in plan.values()) == math.floor(0.3 * total)


def test_taylor_importance_matches_hand_computation():
    model = nn.Sequential(nn.Linear(1, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[2.0], [1.0]]))
        model[2].weight.copy_(torch.tensor([[3.0, -4.0]]))
    graph = build_graph(model, torch.ones(1, 1))
    batches = [(torch.ones(1, 1), None), (2 * torch.ones(1, 1), None)]
    scores = taylor_importance(model, graph, batches, loss_fn=lambda out, _: out.sum())
    # out = 3*relu(2x) - 4*relu(x); dL/dw0 = 3x, dL/dw1 = -4x: (g*w)^2 = (6x)^2, (4x)^2; mean over x=1,2
    torch.testing.assert_close(scores["0"], torch.tensor([(36 + 144) / 2, (16 + 64) / 2]))
    assert model[0].weight.grad is None
    # second order, with c_b = g*w per channel: 6x for channel 0 and -4x for channel 1 at
    # x = 1, 2; the score is (mean c - mean c^2 / 2)^2
    second = taylor_importance(model, graph, batches, loss_fn=lambda out, _: out.sum(), order=2)
    expected = [((6 + 12) / 2 - (36 + 144) / 4) ** 2, ((-4 - 8) / 2 - (16 + 64) / 4) ** 2]
    torch.testing.assert_close(second["0"], torch.tensor(expected))
    with pytest.raises(ConfigError, match="order must be 1 or 2"):
        taylor_importance(model, graph, batches, order=3)


def test_prune_to_flops_hits_the_target():
    model, x = CifarResNet(20).eval(), torch.randn(1, 3, 32, 32)
    small, ratio = prune_to_flops(model, x, 0.5, tolerance=0.01)
    removed = 1 - model_cost(small, x).macs / model_cost(model, x).macs
    # whole channels of 16-wide layers: the removed share moves in steps of a few percent
    assert abs(removed - 0.5) <= 0.03 and 0.2 < ratio < 0.5
    assert model_cost(prune_channels(model, x, ratio), x).macs == model_cost(small, x).macs
    with pytest.raises(ConfigError, match="at most"):
        prune_to_flops(create_model("lenet300_100"), torch.randn(1, 1, 28, 28), 0.999, tolerance=0.0)  # fc1 keeps its inputs


def test_model_cost_of_lenet300_100():
    cost = model_cost(create_model("lenet300_100"), torch.randn(4, 1, 28, 28))
    assert cost.macs == 784 * 300 + 300 * 100 + 100 * 10
    assert cost.parameters == cost.macs + 300 + 100 + 10


def test_model_cost_of_a_conv_and_per_token_linears_by_hand():
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    assert model_cost(conv, torch.randn(2, 3, 8, 8)).macs == 4 * 3 * 9 * 8 * 8 + 256 * 10  # per example
    tokens = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 2))
    assert model_cost(tokens, torch.randn(2, 7, 6)).macs == 7 * (6 * 5 + 5 * 2)  # every token of one example


def run_export_in_a_new_python(path, x: torch.Tensor, tmp_path) -> tuple[torch.Tensor, bool]:
    """Load a torch.export archive in a fresh interpreter and run it on ``x``: its output, and
    whether anything of secateurs got imported there."""
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch\n"
        f"m = torch.export.load({str(path)!r}).module()\n"
        f"torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})\n"
        "print(any(k.startswith('secateurs') for k in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return torch.load(tmp_path / "y.pt"), out.stdout.strip() == "True"


def test_saved_compact_model_reloads_without_its_class(tmp_path):
    model, x = CifarResNet(8).eval(), torch.randn(3, 3, 32, 32)
    small = prune_channels(model, x[:1], 0.5)  # option-A pads become GraphModules
    path = tmp_path / "small.pt2"
    save_compact(small, path, x[:1])
    y, imported = run_export_in_a_new_python(path, x, tmp_path)
    assert not imported
    with torch.no_grad():
        torch.testing.assert_close(y, small(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(load_compact(path)(x[:1]), small(x[:1]), atol=1e-6, rtol=0)


def test_taylor_importance_on_a_graph_with_nothing_prunable_says_why_instead_of_crashing():
    from secateurs.structured.graph import build_graph

    model = nn.Sequential(nn.Linear(4, 3))  # its inputs and logits are both fixed
    graph = build_graph(model, torch.randn(1, 4))
    assert not graph.prunable
    with pytest.raises(ConfigError, match="no prunable channel group.*graph.frozen"):
        taylor_importance(model, graph, [(torch.randn(2, 4), torch.tensor([0, 1]))])


def test_a_tuple_output_is_exported_whole_and_a_mapping_as_its_logits(tmp_path):
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return self.a(x), self.b(x)

    class Mapped(TwoHeads):
        def forward(self, x):
            return {"logits": self.a(x), "aux": self.b(x)}

    torch.manual_seed(0)
    model, x = TwoHeads().eval(), torch.randn(3, 4)
    save_compact(model, tmp_path / "two.pt2", x)
    out = load_compact(tmp_path / "two.pt2")(x)
    assert isinstance(out, tuple) and len(out) == 2
    with torch.no_grad():
        torch.testing.assert_close(out[1], model.b(x))
    mapped = Mapped().eval()
    save_compact(mapped, tmp_path / "mapped.pt2", x)
    with torch.no_grad():
        torch.testing.assert_close(load_compact(tmp_path / "mapped.pt2")(x), mapped.a(x))
