"""FLOPs accounting (RigL appendix H / GraNet Table 3): MACs per layer, inference and training cost."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from secateurs.analysis.flops import flops_report, inference_flops, layer_macs, training_flops
from secateurs.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# layer_macs


def test_linear_and_conv_macs_by_hand():
    assert layer_macs(nn.Linear(3, 4), torch.zeros(5, 3)) == {"weight": 3 * 4}
    # 5 output channels x 6 x 6 positions, each (2 in channels x 3 x 3 kernel) MACs.
    conv = nn.Conv2d(2, 5, 3, padding=1)
    assert layer_macs(conv, torch.zeros(2, 2, 6, 6)) == {"weight": 5 * 36 * 2 * 9}


def test_sequential_keys_are_parameter_names():
    model = nn.Sequential(
        nn.Conv2d(2, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 36, 10)
    )
    macs = layer_macs(model, torch.zeros(3, 2, 6, 6))
    assert macs == {"0.weight": 3240, "4.weight": 180 * 10}
    assert set(macs) <= {n for n, _ in model.named_parameters()}


def test_grouped_and_depthwise_conv():
    grouped = nn.Conv2d(4, 8, 3, groups=2)  # 5x5 -> 3x3, each output sees 2 channels x 9
    assert layer_macs(grouped, torch.zeros(1, 4, 5, 5)) == {"weight": 8 * 9 * 2 * 9}
    depthwise = nn.Conv2d(4, 4, 3, groups=4, padding=1)  # each output sees 1 channel x 9
    assert layer_macs(depthwise, torch.zeros(1, 4, 5, 5)) == {"weight": 4 * 25 * 9}


def test_conv1d_conv3d_and_stride():
    assert layer_macs(nn.Conv1d(2, 3, 3), torch.zeros(2, 2, 10)) == {"weight": 3 * 8 * 2 * 3}
    assert layer_macs(nn.Conv3d(1, 2, 2), torch.zeros(1, 1, 4, 4, 4)) == {"weight": 2 * 27 * 8}
    strided = nn.Conv2d(1, 1, 2, stride=2)  # 6x6 -> 3x3
    assert layer_macs(strided, torch.zeros(1, 1, 6, 6)) == {"weight": 9 * 4}


def test_linear_on_3d_input():
    # (B, T, F): every one of the T positions costs out x in MACs.
    assert layer_macs(nn.Linear(6, 7), torch.zeros(2, 5, 6)) == {"weight": 5 * 7 * 6}


def test_batch_size_independent():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 2))
    one = layer_macs(model, torch.zeros(1, 3, 8, 8))
    eight = layer_macs(model, torch.randn(8, 3, 8, 8))
    assert one == eight
    assert one["0.weight"] == 4 * 36 * 3 * 9


def test_names_filter_and_bad_name():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    x = torch.zeros(2, 3)
    assert layer_macs(model, x, names=["2.weight"]) == {"2.weight": 8}
    assert layer_macs(model, x, names="0.weight") == {"0.weight": 12}
    for bad in ("1.weight", "0.bias", "fc.weight"):
        with pytest.raises(ConfigError, match="0.weight"):  # the message lists valid names
            layer_macs(model, x, names=[bad])


def test_hooks_removed_and_modes_restored():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    model.train()
    model[2].eval()  # a mixed state must come back exactly
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(m.training))
    layer_macs(model, torch.zeros(1, 3))
    assert seen == [False]  # measured in eval mode
    assert model.training and model[0].training and not model[2].training
    assert len(model[0]._forward_hooks) == 1  # only the user's hook is left
    assert not model[2]._forward_hooks


def test_hooks_removed_when_forward_fails():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(5, 2))
    model.train()
    with pytest.raises(RuntimeError):
        layer_macs(model, torch.zeros(1, 3))
    assert not model[0]._forward_hooks and not model[1]._forward_hooks
    assert model.training and model[0].training


def test_no_grad_and_unreached_layers():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 2)

        def forward(self, x):
            assert not torch.is_grad_enabled()
            return self.used(x)

    assert layer_macs(Branchy(), torch.zeros(1, 3)) == {"used.weight": 6, "unused.weight": 0}


def test_reused_and_tied_layers_count_every_call():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.tied = nn.Linear(4, 4)
            self.tied.weight = self.fc.weight

        def forward(self, x):
            return self.tied(self.fc(self.fc(x)))

    model = Twice()
    assert [n for n, _ in model.named_parameters() if n.endswith("weight")] == ["fc.weight"]
    assert layer_macs(model, torch.zeros(2, 4)) == {"fc.weight": 3 * 16}


def test_wrappers_unwrapped():
    inner = nn.Sequential(nn.Linear(3, 4))

    class Compiled(nn.Module):  # stands in for torch.compile's OptimizedModule
        def __init__(self, mod):
            super().__init__()
            self._orig_mod = mod

        def forward(self, x):
            return self._orig_mod(x)

    wrapped = Compiled(nn.DataParallel(inner))
    assert layer_macs(wrapped, torch.zeros(1, 3)) == {"0.weight": 12}


def test_bad_example_input():
    with pytest.raises(ConfigError, match="example_input"):
        layer_macs(nn.Linear(3, 4), torch.tensor(1.0))


# ---------------------------------------------------------------------------------------------
# inference_flops

MACS = {"a": 1000, "b": 3000, "c": 6000}  # f_D = 10_000


def test_inference_uniform_density_fraction():
    for d in (0.0, 0.05, 0.2, 1.0):
        out = inference_flops(MACS, {n: d for n in MACS})
        assert out["dense"] == 10_000 and isinstance(out["dense"], int)
        assert out["fraction"] == pytest.approx(d)
        assert out["sparse"] == pytest.approx(d * 10_000)


def test_inference_missing_layers_dense_by_hand():
    out = inference_flops(MACS, {"b": 0.1, "c": 0.5})
    assert out["sparse"] == pytest.approx(1000 + 300 + 3000)
    assert out["fraction"] == pytest.approx(0.43)


@pytest.mark.parametrize(
    "densities, match",
    [({"a": 1.5}, "1.5"), ({"a": -0.1}, "-0.1"), ({"a": float("nan")}, "nan"), ({"zzz": 0.5}, "zzz")],
)
def test_inference_validation(densities, match):
    with pytest.raises(ConfigError, match=match):
        inference_flops(MACS, densities)


def test_zero_macs_rejected():
    with pytest.raises(ConfigError, match="sum to 0"):
        inference_flops({"a": 0}, {})


# ---------------------------------------------------------------------------------------------
# training_flops


def _uniform(d):
    return {n: d for n in MACS}


def test_training_constant_density_is_density():
    out = training_flops(MACS, [], 100, initial_density=_uniform(0.2))
    assert out["fraction"] == pytest.approx(0.2)
    assert out["dense"] == 3 * 10_000 * 100
    assert out["dense_gradient_steps"] == 0
    assert training_flops(MACS, [], 100)["fraction"] == pytest.approx(1.0)


def test_event_at_step_zero_applies_from_first_step():
    out = training_flops(MACS, [{"step": 0, "density": _uniform(0.2), "dense_gradient": True}], 100)
    assert out["fraction"] == pytest.approx(0.2)
    assert out["dense_gradient_steps"] == 0  # no step 0 to charge


def test_dense_to_sparse_timeline_by_hand():
    events = [{"step": 50, "density": _uniform(0.1), "dense_gradient": False}]
    out = training_flops(MACS, events, 100)
    assert out["fraction"] == pytest.approx((50 + 50 * 0.1) / 100)
    assert out["sparse"] == pytest.approx(3 * 10_000 * (50 + 5))


def test_event_leaving_out_a_layer_keeps_its_density():
    events = [
        {"step": 0, "density": _uniform(0.5)},
        {"step": 10, "density": {"c": 0.0}, "note": "extra keys ignored"},
    ]
    out = training_flops(MACS, events, 20)
    # steps 1..10 at f_S = 5000, steps 11..20 with a, b still at 0.5: f_S = 2000
    assert out["sparse"] == pytest.approx(3 * (10 * 5000 + 10 * 2000))


def test_dense_gradient_steps_cost_exactly_fd_minus_fs():
    base = [{"step": 0, "density": _uniform(0.2)}]
    rigl = base + [{"step": s, "density": _uniform(0.2), "dense_gradient": True} for s in (10, 20, 30)]
    plain = training_flops(MACS, base, 100, batch_size=4)
    grown = training_flops(MACS, rigl, 100, batch_size=4)
    f_d, f_s = 10_000, 2_000
    assert grown["dense_gradient_steps"] == 3
    assert grown["sparse"] - plain["sparse"] == pytest.approx(3 * (f_d - f_s) * 4)
    assert grown["dense"] == plain["dense"] == 3 * f_d * 100 * 4


def test_dense_gradient_charged_at_density_during_the_step():
    # The update after step 10 prunes to 0.1, but step 10 itself ran at 0.5.
    events = [
        {"step": 0, "density": _uniform(0.5)},
        {"step": 10, "density": _uniform(0.1), "dense_gradient": True},
        {"step": 10, "density": _uniform(0.1), "dense_gradient": True},  # same step: charged once
    ]
    out = training_flops(MACS, events, 20)
    expected = 9 * 3 * 5000 + (2 * 5000 + 10_000) + 10 * 3 * 1000
    assert out["sparse"] == pytest.approx(expected)
    assert out["dense_gradient_steps"] == 1


def test_event_at_last_step_only_charges_its_gradient():
    events = [{"step": 5, "density": _uniform(0.0), "dense_gradient": True}]
    out = training_flops(MACS, events, 5)
    assert out["sparse"] == pytest.approx(4 * 30_000 + 30_000)
    assert out["fraction"] == pytest.approx(1.0)


def test_batch_size_scales_both_and_keeps_fraction():
    events = [{"step": 3, "density": _uniform(0.3)}]
    one = training_flops(MACS, events, 10)
    many = training_flops(MACS, events, 10, batch_size=128)
    assert many["sparse"] == pytest.approx(128 * one["sparse"])
    assert many["fraction"] == pytest.approx(one["fraction"])


def test_cost_independent_of_total_steps():
    events = [{"step": 10**11, "density": _uniform(0.5), "dense_gradient": True}]
    out = training_flops(MACS, events, 10**12)  # would never finish if it looped over steps
    assert out["fraction"] == pytest.approx(0.1 + 0.9 * 0.5)


@pytest.mark.parametrize(
    "events, total_steps, batch_size, match",
    [
        ([{"step": 20, "density": {}}, {"step": 10, "density": {}}], 100, 1, "sort"),
        ([{"step": 101, "density": {}}], 100, 1, "outside"),
        ([{"step": -1, "density": {}}], 100, 1, "outside"),
        ([{"step": 5, "density": {"a": 1.5}}], 100, 1, "1.5"),
        ([{"step": 5, "density": {"conv9.weight": 0.5}}], 100, 1, "conv9.weight"),
        ([{"density": {}}], 100, 1, "step"),
        ([], 0, 1, "total_steps"),
        ([], 100, 0, "batch_size"),
    ],
)
def test_training_validation(events, total_steps, batch_size, match):
    with pytest.raises(ConfigError, match=match):
        training_flops(MACS, events, total_steps, batch_size=batch_size)


def test_bad_initial_density():
    with pytest.raises(ConfigError, match="initial_density"):
        training_flops(MACS, [], 10, initial_density={"a": 2.0})


# ---------------------------------------------------------------------------------------------
# flops_report


def test_report_end_to_end_is_json_serialisable():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 10))
    macs = layer_macs(model, torch.zeros(2, 3, 4, 4))
    events = [
        {"step": 0, "density": {n: 0.5 for n in macs}},
        {"step": 50, "density": {n: 0.2 for n in macs}, "dense_gradient": True},
    ]
    report = flops_report(macs, events, 100, {n: 0.2 for n in macs}, batch_size=32)
    assert json.loads(json.dumps(report)) == report
    assert report["inference"]["fraction"] == pytest.approx(0.2)
    f_d = sum(macs.values())
    expected = (49 * 3 * 0.5 + (2 * 0.5 + 1) + 50 * 3 * 0.2) * f_d / (3 * f_d * 100)
    assert report["training"]["fraction"] == pytest.approx(expected)
    # None takes the densities after the last event
    assert flops_report(macs, events, 100, None) == flops_report(macs, events, 100, {n: 0.2 for n in macs})
