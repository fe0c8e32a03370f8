"""Structured pruning of Hugging Face transformers: whole attention heads and MLP units,
found by block handlers without tracing, removed consistently across q/k/v/o and gate/up/down."""
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from secateurs.analysis.flops import layer_macs  # noqa: E402
from secateurs.errors import ConfigError  # noqa: E402
from secateurs.outputs import call_model, logits_of  # noqa: E402
from secateurs.structured import load_compact, save_compact  # noqa: E402
from secateurs.structured.blocks import (  # noqa: E402
    BLOCKS, UnitGroup, count_parameters, find_unit_groups, prune_units, remove_units_,
    save_pretrained_compact, unit_importance,
)

from test_hf_zoo import batch, build, inputs_of  # noqa: E402
from test_structured_prune import run_export_in_a_new_python  # noqa: E402

TRANSFORMERS = ["vit", "deit", "swin", "bert", "gpt2", "llama"]


def run(model, x):
    with torch.no_grad():
        return logits_of(call_model(model, x))


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_every_block_has_one_head_group_and_one_mlp_group(name):
    groups = find_unit_groups(build(name))
    assert [g.kind for g in groups].count("heads") == 2 and [g.kind for g in groups].count("mlp") == 2


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_removing_units_whose_output_weights_are_zero_is_lossless(name):
    """Zero the o_proj / down_proj columns of the units to drop: they contribute nothing, so
    removing them (q, k, v, gate, up rows and the per-head bias table with them) must not
    change the output."""
    model = build(name).eval()
    x = inputs_of(name, batch(name))
    groups = find_unit_groups(model)
    modules = dict(model.named_modules())
    plan = {}
    with torch.no_grad():
        for g in groups:
            drop = list(range(0, g.units, 2))  # every other unit
            plan[g.name] = [u for u in range(g.units) if u not in drop]
            for p in g.parts:
                if p.side == "in":
                    layer = modules[p.layer]
                    w = layer.weight
                    axis = 0 if type(layer).__name__ == "Conv1D" else 1  # the input axis ([in, out] for Conv1D)
                    for u in drop:
                        w.narrow(axis, p.offset + u * p.width, p.width).zero_()
    before, shape = run(model, x), run(model, x).shape
    params_before = count_parameters(model)
    for g in groups:
        remove_units_(model, g, plan[g.name])
    after = run(model, x)
    assert after.shape == shape
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert count_parameters(model) < params_before


def test_llama_grouped_query_heads_parameters_and_macs_by_hand():
    """Llama tiny: hidden 32, 4 query heads over 2 key/value heads of size 8, MLP 64. A unit is
    one key/value group (its 2 query heads follow it)."""
    model = build("llama").eval()
    ids = torch.randint(0, 100, (2, 16))
    groups = find_unit_groups(model)
    heads = [g for g in groups if g.kind == "heads"]
    assert all(g.units == 2 and g.unit_size == 16 for g in heads)
    p0, macs0 = count_parameters(model), sum(layer_macs(model, {"input_ids": ids}).values())
    prune_units(model, 0.5)
    per_layer_params = (16 * 32 + 8 * 32 + 8 * 32 + 16 * 32) + 3 * 32 * 32  # one kv group + 32 MLP units
    assert count_parameters(model) == p0 - 2 * per_layer_params
    assert sum(layer_macs(model, {"input_ids": ids}).values()) == macs0 - 16 * 2 * per_layer_params
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == 16 and attn.k_proj.out_features == 8 and attn.o_proj.in_features == 16
    assert run(model, {"input_ids": ids}).shape == (2, 16, 100)


def test_gpt2_fused_qkv_removes_the_same_head_from_q_k_and_v():
    model = build("gpt2").eval()
    g = next(g for g in find_unit_groups(model) if g.kind == "heads")
    attn = model.get_submodule(g.module)
    w = attn.c_attn.weight.detach().clone()  # [in 32, out 96] = q | k | v, 4 heads of 8
    remove_units_(model, g, [0, 2, 3])
    kept = torch.cat([torch.arange(b + h * 8, b + h * 8 + 8) for b in (0, 32, 64) for h in (0, 2, 3)])
    assert torch.equal(attn.c_attn.weight, w[:, kept])
    assert attn.split_size == 24 and attn.c_attn.nf == 72 and attn.c_proj.nx == 24


def test_l1_keeps_the_heaviest_unit_and_taylor_runs_on_raw_batches():
    model = build("bert")
    g = next(g for g in find_unit_groups(model) if g.kind == "heads")
    with torch.no_grad():
        model.get_submodule(g.module).self.query.weight[8:16] *= 100  # head 1
    assert int(unit_importance(model, [g], "l1")[g.name].argmax()) == 1
    scores = unit_importance(model, find_unit_groups(model), "taylor", batches=[batch("bert")])
    assert all(s.shape == (grp.units,) and torch.isfinite(s).all() for grp, s in zip(find_unit_groups(model), scores.values()))
    plan = prune_units(model, {"heads": 0.5, "mlp": 0.0}, importance="l1")
    assert [1 in kept for name, kept in plan.items() if name == g.name] == [True]


@pytest.mark.parametrize("name", ["llama", "vit"])
def test_uniform_plan_round_trips_through_save_pretrained(name, tmp_path):
    model = build(name).eval()
    x = inputs_of(name, batch(name))
    prune_units(model, 0.5)
    changes = save_pretrained_compact(model, tmp_path)
    assert changes["num_attention_heads"] == 2  # of 4
    if name == "llama":
        assert changes["num_key_value_heads"] == 1  # of 2: a unit is one key/value group
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(run(again, x), run(model, x), atol=1e-5, rtol=0)


def test_configs_that_cannot_express_the_sizes_are_refused_with_the_alternative(tmp_path):
    model = build("bert")
    prune_units(model, 0.5)
    with pytest.raises(ConfigError, match="cannot express the pruned sizes.*save_compact"):
        save_pretrained_compact(model, tmp_path)


def test_torch_export_archive_reloads_a_pruned_llama_without_secateurs(tmp_path):
    model = build("llama").eval()
    prune_units(model, 0.5)
    ids = torch.randint(0, 100, (3, 16))
    path = tmp_path / "llama.pt2"
    save_compact(model, path, {"input_ids": ids[:1]})
    y, imported = run_export_in_a_new_python(path, ids, tmp_path)
    assert not imported
    torch.testing.assert_close(y, run(model, ids), atol=1e-5, rtol=0)
    assert load_compact(path)(ids).shape == (3, 16, 100)


# -- bad input -----------------------------------------------------------------------------------
class _Attention(nn.Module):
    def __init__(self, head_dim):
        super().__init__()
        self.head_dim = head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(12, 12) for _ in range(4))


class _HeadCount(_Attention):
    def __init__(self):
        super().__init__(None)
        self.num_heads = 3


def test_a_head_size_that_does_not_divide_the_projections_is_named():
    with pytest.raises(ConfigError, match="head size 5 does not divide the query \\(12\\)"):
        find_unit_groups(nn.Sequential(_Attention(5)))


def test_an_attention_module_without_head_size_or_count_is_refused_not_skipped():
    with pytest.raises(ConfigError, match="looks like attention.*head_dim.*num_heads"):
        find_unit_groups(nn.Sequential(_Attention(None)))
    groups = find_unit_groups(nn.Sequential(_HeadCount()), kinds=["heads"])
    assert groups[0].units == 3 and groups[0].unit_size == 4


def test_a_model_without_recognised_blocks_lists_the_handlers_and_how_to_add_one():
    with pytest.raises(ConfigError, match="no attention or MLP block.*qkvo_attention.*BLOCKS.register"):
        find_unit_groups(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))


def test_a_new_block_type_is_one_registered_handler():
    class TwoLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(4, 6), nn.Linear(6, 4)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    from secateurs.structured.blocks import Part

    @BLOCKS.register("test_up_down")
    def up_down(name, module):
        if not isinstance(module, TwoLayer):
            return None
        return UnitGroup(f"{name}:mlp", "mlp", name, 6, 1, [Part(f"{name}.up", "out", 0, 1), Part(f"{name}.down", "in", 0, 1)])

    try:
        model = nn.Sequential(TwoLayer())
        with pytest.raises(ConfigError, match="no attention block .* heads cannot be pruned"):
            prune_units(model, 0.5)  # heads asked for, none found: refused, not skipped
        prune_units(model, {"mlp": 0.5})
        assert model[0].up.out_features == 3 and model[0].down.in_features == 3
        assert model(torch.randn(2, 4)).shape == (2, 4)
    finally:
        del BLOCKS._entries["test_up_down"]


def test_bad_fractions_are_refused():
    with pytest.raises(ConfigError, match="in \\[0, 1\\)"):
        prune_units(build("llama"), 1.0)
    with pytest.raises(ConfigError, match="unknown unit kind"):
        prune_units(build("llama"), {"channels": 0.5})


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_every_pruned_transformer_exports_and_reloads(name, tmp_path):
    model = build(name).eval()
    x = inputs_of(name, batch(name, 2))
    prune_units(model, 0.5)
    save_compact(model, tmp_path / "m.pt2", x)
    loaded = load_compact(tmp_path / "m.pt2")
    y = loaded(*x.values()) if isinstance(x, dict) else loaded(x)
    torch.testing.assert_close(y, run(model, x), atol=1e-5, rtol=0)
