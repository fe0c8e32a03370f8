"""Dependency graph: which channel slices are coupled, and what is frozen and why."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from secateurs.errors import ConfigError
from secateurs.models import CifarResNet, create_model
from secateurs.structured import build_graph, build_groups, prune_channels

X32 = torch.randn(1, 3, 32, 32)


class CatNet(nn.Module):
    """Two branches concatenated on channels, BN over the concatenation, then a head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 5, 3)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(20, 3)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), self.b(x)], dim=1)
        y = self.c(F.relu(self.bn(y)))
        return self.fc(torch.flatten(self.pool(y), 1))


class DepthwiseNet(nn.Module):
    """MobileNet-style: conv, depthwise 3x3, pointwise 1x1, each with BN."""

    def __init__(self, groups: int | None = None):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=groups or 8)
        self.bn1 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 12, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        x = F.relu(self.bn0(self.conv0(x)))
        x = F.relu(self.bn1(self.dw(x)))
        x = F.relu(self.bn2(self.pw(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            return x
        return -x


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = Gate()
        self.conv2 = nn.Conv2d(4, 6, 3)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        x = self.conv2(self.gate(F.relu(self.conv(x))))
        return self.head(x.mean((2, 3)))


def slices(group):
    return {(s.module, s.role): s.indices for s in group.slices}


def test_lenet5_flatten_maps_each_channel_to_hw_features():
    model = create_model("lenet5")
    graph = build_graph(model, torch.randn(1, 1, 28, 28))
    assert [(g.name, g.units) for g in graph.prunable] == [("features.0", 20), ("features.3", 50), ("classifier.1", 500)]
    fc_in = slices(graph.group("features.3"))[("classifier.1", "in")]
    assert fc_in[0] == tuple(range(16)) and fc_in[49] == tuple(range(49 * 16, 50 * 16))
    assert set(graph.frozen) == {"x", "classifier.3"}  # network input and logits


def test_concat_gives_each_branch_its_offset_slice():
    graph = build_graph(CatNet(), X32)
    b = slices(graph.group("b"))
    assert b[("bn", "bn")] == tuple((i,) for i in range(4, 10))
    assert b[("c", "in")] == tuple((i,) for i in range(4, 10))
    assert slices(graph.group("a"))[("c", "in")] == tuple((i,) for i in range(4))
    assert slices(graph.group("c"))[("fc", "in")][1] == (4, 5, 6, 7)


def test_depthwise_channels_follow_their_input_and_grouped_convs_are_frozen():
    g = slices(build_graph(DepthwiseNet(), X32).group("conv0"))
    assert set(g) == {("conv0", "out"), ("bn0", "bn"), ("dw", "depthwise"), ("bn1", "bn"), ("pw", "in")}
    graph = build_graph(DepthwiseNet(groups=2), X32)
    assert "grouped conv 'dw'" in graph.frozen["conv0"]
    assert "pw" in [g.name for g in graph.prunable]


def test_resnet20_option_a_couples_the_residual_stream_with_zero_pads():
    graph = build_graph(CifarResNet(20), X32)
    stream = graph.group("conv1")
    assert stream.units == 64  # 16 shared by all stages + 16 added in stage 2 + 32 in stage 3
    s = slices(stream)
    assert s[("conv1", "out")][:16] == tuple((i,) for i in range(16)) and s[("conv1", "out")][16] == ()
    assert s[("layer2.0.conv2", "out")][0] == (0,) and s[("layer2.0.conv2", "out")][16] == (16,)
    assert s[("layer3.2.conv2", "out")][63] == (63,) and s[("fc", "in")][63] == (63,)
    assert [p.owner for p in graph.pads] == ["layer2.0.downsample", "layer3.0.downsample"]
    inner = slices(graph.group("layer1.0.conv1"))
    assert set(inner) == {("layer1.0.conv1", "out"), ("layer1.0.bn1", "bn"), ("layer1.0.conv2", "in")}


def test_resnet20_option_b_stream_splits_at_each_projection():
    graph = build_graph(CifarResNet(20, shortcut="B"), X32)
    stage2 = slices(graph.group("layer2.0.conv2"))
    assert ("layer2.0.downsample.0", "out") in stage2 and ("layer2.0.downsample.1", "bn") in stage2
    assert graph.group("conv1").units == 16 and graph.group("layer2.0.conv2").units == 32


def test_exclude_freezes_the_groups_touching_that_layer():
    graph = build_graph(CifarResNet(20), X32, exclude=["layer1.0.conv1"])
    assert "excluded" in graph.frozen["conv1"]  # its input is the residual stream
    assert "layer1.0.conv1" in graph.frozen
    assert "layer1.1.conv1" in [g.name for g in graph.prunable]


def test_untraceable_module_is_captured_by_running_and_can_be_excluded():
    graph = build_graph(Gated(), X32)  # fx fails on the data-dependent branch: the model is run
    assert graph.capture == "run"
    assert ".sum()" in graph.frozen["conv"]  # the branch reads every channel: conv stays whole
    assert "conv2" in [g.name for g in graph.prunable]
    graph = build_graph(Gated(), X32, exclude=["gate"])
    assert graph.capture == "fx"
    assert "conv" in graph.frozen and "conv2" in [g.name for g in graph.prunable]
    small = prune_channels(Gated(), X32, 0.5, exclude=["gate"])
    assert small.conv.out_channels == 4 and small.conv2.out_channels == 3


def test_hard_coded_channel_count_in_view_freezes_the_group():
    class Viewed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 32)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(self.conv(x).view(-1, 8))

    graph = build_graph(Viewed(), X32)
    assert "view" in graph.frozen["conv"]
    assert build_groups(Viewed(), X32) == []


def test_exclude_must_be_a_list():
    with pytest.raises(ConfigError, match="wrap it"):
        build_graph(CatNet(), X32, exclude="a")


class _Overwrite(nn.Module):
    """Channels 0-3 of ``a`` are overwritten in place by ``b``'s (a write that returns nothing),
    behind control flow fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        y, z = self.a(x), self.b(x)
        if int(x.shape[0]) > 0:
            y[:, :4] = z[:, :4]
        return self.c(F.relu(y)).mean((2, 3))


def test_an_in_place_write_in_a_captured_graph_freezes_the_channels_it_touches():
    graph = build_graph(_Overwrite(), torch.randn(1, 3, 16, 16))
    assert graph.capture == "run"
    assert "__setitem__" in graph.frozen["a"]  # pruning a's channels would silently mis-assign the write
    assert not graph.prunable


class _PoolAfterPermute(nn.Module):
    """Conv1d -> permute to channels-last -> fc1 -> a same-size pool, which now pools across
    fc1's output features (the last dim), not along the sequence."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.conv, self.fc1, self.pool, self.fc2 = nn.Conv1d(3, 6, 1), nn.Linear(6, 8), pool, nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(self.pool(self.fc1(self.conv(x).permute(0, 2, 1))))


@pytest.mark.parametrize("pool", [nn.MaxPool1d(3, stride=1, padding=1), nn.AvgPool1d(3, stride=1, padding=1),
                                  nn.ZeroPad1d((-1, 1))])
def test_a_pool_or_pad_across_a_permuted_channel_axis_freezes_the_channels(pool):
    from secateurs.structured import compact_zero_channels

    torch.manual_seed(0)
    m, x = _PoolAfterPermute(pool).eval(), torch.randn(2, 3, 5)
    g = build_graph(m, x[:1])
    assert "fc1" not in [gr.name for gr in g.prunable]
    assert "across the channel axis" in g.frozen["fc1"]
    with torch.no_grad():  # a zero fc1 unit is not removable: the pool mixes it with its neighbours
        m.fc1.weight[3] = 0
        m.fc1.bias[3] = 0
    small = compact_zero_channels(m, x[:1])
    assert small.fc1.out_features == 8
    torch.testing.assert_close(small(x), m(x))


def test_a_2d_pool_on_a_3d_tensor_pools_across_its_channels_and_freezes_them():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv1d(3, 6, 1), nn.Linear(6 * 5, 2)

        def forward(self, x):  # (N, C, L) into a 2-D pool: an unbatched (C', H, W) image, H = channels
            return self.fc(F.max_pool2d(self.conv(x), 3, 1, 1).flatten(1))

    g = build_graph(Net(), torch.randn(1, 3, 5))
    assert "conv" not in [gr.name for gr in g.prunable]
    assert "across the channel axis" in g.frozen["conv"]
    # the usual channels-first pools still pass the channels through
    assert "0" in [gr.name for gr in build_graph(nn.Sequential(nn.Conv1d(3, 6, 1), nn.MaxPool1d(3, 1, 1),
                                                                  nn.Flatten(), nn.Linear(30, 2)),
                                                    torch.randn(1, 3, 5)).prunable]
