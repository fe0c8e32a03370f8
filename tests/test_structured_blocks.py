"""Block handlers on small hand-made blocks: widths that do not match the units are refused,
attention / MLP modules no handler recognises are refused (not left dense), a block at the
model root and a callable data argument work."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs.errors import ConfigError
from secateurs.structured.blocks import find_unit_groups, prune_units, remove_units_, unit_importance


class _CatMLP(nn.Module):
    """fc2 reads [3 extra features | 8 hidden units]: fc2.in_features is 11, not 8."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(3 + 8, 2)

    def forward(self, x, y):
        return self.fc2(torch.cat([y, torch.relu(self.fc1(x))], -1))


class _Attention(nn.Module):
    def __init__(self, q=8, v=8, o="o_proj", heads=2, head_dim=4):
        super().__init__()
        self.num_heads, self.head_dim = heads, head_dim
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, q), nn.Linear(8, q), nn.Linear(8, v)
        setattr(self, o, nn.Linear(v, 8))


class _MLP(nn.Module):
    def __init__(self, hidden=16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, hidden), nn.Linear(hidden, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_an_mlp_consumer_that_also_reads_other_features_is_refused_before_any_cut():
    block = _CatMLP()
    with pytest.raises(ConfigError, match=r"b:mlp: b\.fc2 has 11 inputs but the block's 8 mlp units take 8.*exclude=\['b:mlp'\]"):
        find_unit_groups(nn.ModuleDict({"b": block}), kinds=["mlp"])
    assert find_unit_groups(nn.ModuleDict({"b": block}), exclude=["b:*"], kinds=["mlp"]) == []


def test_remove_units_checks_the_widths_before_cutting_anything():
    from secateurs.structured.blocks import Part, UnitGroup

    model = nn.ModuleDict({"b": _CatMLP()})
    group = UnitGroup("b:mlp", "mlp", "b", 8, 1, [Part("b.fc1", "out", 0, 1), Part("b.fc2", "in", 0, 1)])
    with pytest.raises(ConfigError, match="b.fc2 has 11 inputs"):
        remove_units_(model, group, range(1, 8))
    assert model["b"].fc1.out_features == 8 and model["b"].fc2.weight.shape == (2, 11)


def test_value_heads_of_another_size_than_the_query_heads_are_refused():
    # q/k: 2 heads of 2; v: 2 heads of 4 -- cutting v in 2-wide slices would split its heads
    with pytest.raises(ConfigError, match=r"0:heads: 0\.v_proj has 8 outputs but the block's 2 heads units take 4"):
        find_unit_groups(nn.Sequential(_Attention(q=4, v=8, head_dim=2)), kinds=["heads"])


def test_gate_and_up_projections_of_different_widths_are_refused_not_skipped():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 12), nn.Linear(16, 8)

    with pytest.raises(ConfigError, match="up_proj has 12 outputs but the block's 16 mlp units take 16"):
        find_unit_groups(nn.Sequential(_MLP(), Gated()), kinds=["mlp"])


def test_attention_and_mlp_blocks_no_handler_recognises_are_named_and_refused():
    model = nn.Sequential(_Attention(), _Attention(o="out_proj"), _MLP(), nn.MultiheadAttention(8, 2))
    with pytest.raises(ConfigError, match=r"1 \(_Attention, attention\), 3 \(MultiheadAttention, attention\) look "
                                          r"like attention or MLP blocks.*exclude=\['1:heads', '3:heads'\]"):
        find_unit_groups(model)
    with pytest.raises(ConfigError, match="MultiheadAttention"):
        prune_units(model, 0.5)  # nothing is cut and reported as done while those heads stay dense
    assert model[0].q_proj.out_features == 8
    assert [g.name for g in find_unit_groups(model, exclude=["1:heads", "3:*"])] == ["0:heads", "2:mlp"]
    assert [g.name for g in find_unit_groups(model, kinds=["mlp"])] == ["2:mlp"]  # heads not asked for


def test_an_unrecognised_mlp_class_is_refused():
    class ConvMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w2 = nn.Linear(8, 16), nn.Linear(16, 8)

    with pytest.raises(ConfigError, match=r"1 \(ConvMLP, MLP\)"):
        find_unit_groups(nn.Sequential(_MLP(), ConvMLP()), kinds=["mlp"])


def test_a_wrapper_around_a_recognised_block_and_a_parameterless_attention_count_as_matched():
    class WrapperAttention(nn.Module):  # like ViTAttention around ViTSelfAttention
        def __init__(self):
            super().__init__()
            self.inner = _Attention()

    class ScaledDotProductAttention(nn.Module):  # no weights, no units
        pass

    model = nn.Sequential(WrapperAttention(), ScaledDotProductAttention(), _MLP())
    assert [g.name for g in find_unit_groups(model)] == ["0.inner:heads", "2:mlp"]


def test_one_module_holding_both_attention_and_mlp_layers_gives_both_groups():
    class Block(_Attention):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    groups = find_unit_groups(nn.Sequential(Block()))
    assert sorted((g.name, g.units) for g in groups) == [("0:heads", 2), ("0:mlp", 16)]


def test_a_block_at_the_model_root_is_pruned():
    torch.manual_seed(0)
    model, x = _MLP(), torch.randn(3, 8)
    groups = find_unit_groups(model, kinds=["mlp"])
    assert [p.layer for p in groups[0].parts] == ["fc1", "fc2"]
    plan = prune_units(model, {"mlp": 0.5})
    assert model.fc1.out_features == 8 and model.fc2.in_features == 8 and plan[":mlp"] == sorted(plan[":mlp"])
    assert model(x).shape == (3, 8)


def test_taylor_takes_a_zero_argument_callable_returning_the_batches():
    torch.manual_seed(0)
    model = nn.Sequential(_MLP())
    loader = [(torch.randn(4, 8), torch.randint(0, 8, (4,)))]
    groups = find_unit_groups(model, kinds=["mlp"])
    from_callable = unit_importance(model, groups, "taylor", lambda: loader)
    from_list = unit_importance(model, groups, "taylor", loader)
    assert from_callable["0:mlp"].shape == (16,) and from_callable["0:mlp"].sum() > 0
    torch.testing.assert_close(from_callable["0:mlp"], from_list["0:mlp"])
