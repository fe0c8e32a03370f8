"""Structured pruning on all ten Hugging Face architectures: half of the MACs removed with the
output shape kept, dead channels compacted without changing outputs, Taylor on the raw model.

The CNNs go through the channel dependency graph, captured by running the model because
``torch.fx`` cannot trace them; the transformers through the attention / MLP block handlers.
"""
import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from secateurs.analysis.flops import layer_macs  # noqa: E402
from secateurs.outputs import call_model, logits_of  # noqa: E402
from secateurs.structured import compact_zero_channels, prune_to_flops, taylor_importance  # noqa: E402
from secateurs.structured.blocks import find_unit_groups, prune_units_to_macs, unit_importance  # noqa: E402
from secateurs.structured.graph import build_graph  # noqa: E402
from secateurs.structured.prune import zero_units  # noqa: E402

from test_hf_zoo import ZOO, batch, build, inputs_of  # noqa: E402
from test_structured_prune import predicted_parameters, zero_channels_  # noqa: E402

CNNS = ["resnet", "mobilenet_v2", "convnext", "efficientnet"]
X = torch.randn(1, 3, 32, 32)


def run(model, x):
    with torch.no_grad():
        return logits_of(call_model(model, x))


@pytest.mark.parametrize("name", ZOO)
def test_half_of_the_macs_removed_keeps_the_output_shape(name):
    model = build(name).eval()
    if name in CNNS:
        small, _ = prune_to_flops(model, X, 0.5, importance="l1")
        x = X.expand(2, -1, -1, -1)
    else:
        x = inputs_of(name, batch(name, 2))
        small, _ = prune_units_to_macs(model, x, 0.5, importance="l1")
    removed = 1 - sum(layer_macs(small, x).values()) / sum(layer_macs(model, x).values())
    assert 0.45 <= removed <= 0.56, removed
    assert run(small, x).shape == run(model, x).shape
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", CNNS)
def test_compacting_dead_channels_is_lossless(name):
    model = build(name).double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    graph = build_graph(model, x[:1])
    assert graph.capture == "run"  # torch.fx cannot trace any of these
    chosen = {}
    with torch.no_grad():
        for g in graph.prunable:
            safe = [u for u in range(g.units) if u not in graph.unsafe_to_compact.get(g.name, ())]
            if len(safe) < 3 or len(safe) < g.units:  # a group left with no unit keeps one: skip tiny ones
                continue
            chosen[g.name] = sorted({safe[0], safe[len(safe) // 2]})
            zero_channels_(model, g, chosen[g.name])
    assert chosen, "no group can be compacted"
    assert zero_units(model, graph) == chosen
    small = compact_zero_channels(model, x[:1])
    assert sum(p.numel() for p in small.parameters()) == predicted_parameters(model, graph, chosen)
    torch.testing.assert_close(run(small, x), run(model, x), atol=1e-5, rtol=0)


def test_convnext_channels_follow_its_permutes_layer_norms_and_layer_scale():
    model = build("convnext").eval()
    graph = build_graph(model, X)
    mlp = graph.group("convnext.encoder.stages.0.layers.0.pwconv1")
    assert {(s.module, s.role) for s in mlp.slices} == {
        ("convnext.encoder.stages.0.layers.0.pwconv1", "out"), ("convnext.encoder.stages.0.layers.0.pwconv2", "in")}
    stream = graph.group("convnext.embeddings.patch_embeddings")
    roles = {(s.module, s.role) for s in stream.slices}
    assert ("convnext.embeddings.layernorm", "ln") in roles  # a channels-first LayerNorm (permute inside)
    assert ("convnext.encoder.stages.0.layers.0.layernorm", "ln") in roles  # channels-last, after a permute
    assert ("convnext.encoder.stages.0.layers.0", "param:layer_scale_parameter:0") in roles
    assert ("convnext.encoder.stages.0.layers.0.dwconv", "depthwise") in roles


@pytest.mark.parametrize("name", ZOO)
def test_taylor_scores_on_the_raw_model(name):
    model = build(name)
    b = batch(name)
    if name in CNNS:
        with torch.no_grad():  # HF EfficientNet's init zeroes some BN scales: its random output is ~1e-38
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
        graph = build_graph(model, X)
        scores = taylor_importance(model, graph, [b])
        assert set(scores) == {g.name for g in graph.prunable}
    else:
        groups = find_unit_groups(model)
        scores = unit_importance(model, groups, "taylor", batches=[b])
    assert all(torch.isfinite(s).all() and (s >= 0).all() for s in scores.values())
    assert any((s > 0).any() for s in scores.values())


def test_an_input_the_model_rejects_during_capture_shows_the_models_error_and_the_shape():
    from secateurs.errors import ConfigError

    with pytest.raises(ConfigError, match=r"example_input of shape \(1, 1, 32, 32\) does not fit .*pass a batch the model accepts.*channel"):
        build_graph(build("mobilenet_v2"), torch.randn(1, 1, 32, 32))


def test_a_channel_pruned_hf_cnn_saves_as_a_torch_export_archive(tmp_path):
    from secateurs.structured import load_compact, save_compact

    small, _ = prune_to_flops(build("resnet").eval(), X, 0.5)
    save_compact(small, tmp_path / "resnet.pt2", X)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(load_compact(tmp_path / "resnet.pt2")(x), run(small, x), atol=1e-5, rtol=0)
