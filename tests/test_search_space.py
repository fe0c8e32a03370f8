"""The shared search space: candidates build into the modules they describe, serialise, expand
by exactly one block, sample inside the space, and give position-stable surrogate features."""
import json

import pytest
import torch
from torch import nn

from secateurs.errors import ConfigError
from secateurs.search.space import OPS, Architecture, Block, InputShape, SearchSpace, build, layer_shapes

SHAPE = InputShape(1, 28, 10)


def test_build_matches_the_description_layer_by_layer():
    arch = Architecture((Block("conv3", 16, pool=True), Block("dwsep5", 32, pool=True), Block("fc", 64)))
    model = build(arch, SHAPE)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.groups) for c in convs] == [
        (1, 16, (3, 3), 1), (16, 16, (5, 5), 16), (16, 32, (1, 1), 1)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(32 * 7 * 7, 64), (64, 10)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 2
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    plain = build(arch, SHAPE, batchnorm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert [s["out"] for s in layer_shapes(arch, SHAPE)] == [(16, 14, 14), (32, 7, 7), (64,), (10,)]


def test_mlp_and_linear_candidates():
    model = build(Architecture.mlp([300, 100]), SHAPE)
    assert sum(p.numel() for p in model.parameters()) == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert Architecture.mlp([300, 100]).label == "fc-300.fc-100"
    assert build(Architecture(), SHAPE)(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_json_round_trip_and_hashing():
    arch = Architecture((Block("conv5", 8), Block("fc", 32)))
    again = Architecture.from_dict(json.loads(json.dumps(arch.to_dict())))
    assert again == arch and hash(again) == hash(arch)
    assert Architecture(({"op": "conv5", "width": 8}, {"op": "fc", "width": 32})) == arch


def test_expand_appends_exactly_one_allowed_block():
    space = SearchSpace(ops=("conv3", "dwsep3"), conv_widths=(8, 16), fc_widths=(32,), max_conv=2, max_fc=1)
    roots = space.roots(SHAPE)
    assert len(roots) == 2 * 2 * 2 + 1  # op x width x pool, plus one fc
    parent = Architecture((Block("conv3", 8, pool=True),))
    children = space.expand(parent, SHAPE)
    assert all(c.blocks[:-1] == parent.blocks and len(c) == 2 for c in children)
    assert len(children) == 9 and len(set(children)) == 9
    assert space.expand(Architecture((Block("fc", 32),)), SHAPE) == []  # no conv after fc, fc full
    full = Architecture((Block("conv3", 8), Block("conv3", 8), Block("fc", 32)))
    assert space.expand(full, SHAPE) == [] and space.contains(full, SHAPE)


def test_pools_are_limited_by_the_image():
    space = SearchSpace(ops=("conv3",), conv_widths=(8,), fc_widths=(), max_conv=4, max_fc=0)
    assert space.pool_limit(SHAPE) == 2  # 28 -> 14 -> 7; a third pool would go below 4px
    arch = Architecture((Block("conv3", 8, True), Block("conv3", 8, True)))
    assert all(not c.blocks[-1].pool for c in space.expand(arch, SHAPE))
    with pytest.raises(ConfigError, match="pools 5 times"):
        build(Architecture(tuple(Block("conv3", 8, True) for _ in range(5))), SHAPE)


def test_samples_lie_in_the_space_and_are_seeded():
    space = SearchSpace()
    draw = lambda seed: [space.sample(torch.Generator().manual_seed(seed), SHAPE) for _ in range(1)][0]  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    samples = [space.sample(gen, SHAPE) for _ in range(200)]
    assert all(space.contains(a, SHAPE) and len(a) >= 1 for a in samples)
    assert len({len(a) for a in samples}) == space.max_blocks
    assert draw(3) == draw(3)


def test_features_keep_a_block_in_its_slot_as_the_chain_grows():
    space = SearchSpace(max_conv=2, max_fc=1)
    per = len(OPS) + 2
    short = space.features(Architecture((Block("fc", 64),)))
    long = space.features(Architecture((Block("conv3", 8, True), Block("fc", 64))))
    fc_slot = slice(2 * per, 3 * per)
    assert torch.equal(short[fc_slot], long[fc_slot])
    assert long[OPS.index("conv3")] == 1 and long[len(OPS)] == 3 and long[len(OPS) + 1] == 1
    assert short.shape == (len(space.feature_names()),)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_conv=0, max_fc=0), "search space is empty"),
    (dict(ops=(), fc_widths=()), "search space is empty"),
    (dict(ops=("conv7",)), "unknown conv ops"),
    (dict(conv_widths=(), max_fc=0), "search space is empty"),
    (dict(fc_widths=(), max_fc=1), "space.fc_widths is empty"),
])
def test_bad_spaces_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SearchSpace(**kwargs)


def test_bad_candidates_are_refused():
    with pytest.raises(ConfigError, match="conv blocks come first"):
        Architecture((Block("fc", 8), Block("conv3", 8)))
    with pytest.raises(ConfigError, match="unknown block op"):
        Block("maxpool", 8)
    with pytest.raises(ConfigError, match="cannot pool"):
        Block("fc", 8, pool=True)
    with pytest.raises(ConfigError, match="a block is"):
        Architecture.from_dict({"blocks": [{"op": "conv3"}]})
