"""Brain-inspired synaptic pruning (Zhao & Zeng 2021, method 'synaptic'): the activity score
by hand, the consecutive-checks rule firing exactly at ``patience`` (and a streak reset),
exact sparsity at every update, resume, and one ConfigError per bad setting."""
import pytest
import torch
from torch import nn

from secateurs import ConfigError
from secateurs.allocation import keep_count
from secateurs.methods import METHODS, SynapticPruning
from secateurs.scores import activity
from secateurs.streaks import Streaks, below_layer_mean


def _batch(*rows):
    x = torch.tensor(rows, dtype=torch.float32)
    return x, torch.zeros(len(rows), dtype=torch.long)


def test_activity_is_weight_times_mean_absolute_input_by_hand():
    model = nn.Sequential(nn.Linear(3, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0]]))
        model[2].weight.copy_(torch.tensor([[3.0, -1.0]]))
    before = {n: p.clone() for n, p in model.named_parameters()}
    scores = activity(model, {"0.weight": model[0].weight, "2.weight": model[2].weight},
                      [_batch([1.0, 0.0, 2.0], [-1.0, 0.0, 4.0])])
    # E|x| = (1, 0, 3): the unused input scores 0 whatever its weight (-2)
    assert torch.allclose(scores["0.weight"], torch.tensor([[1.0, 0.0, 1.5], [0.0, 0.0, 3.0]]))
    # hidden ReLU outputs (2, 2) and (1, 4): E|h| = (1.5, 3)
    assert torch.allclose(scores["2.weight"], torch.tensor([[4.5, 3.0]]))
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())
    assert not model[0]._forward_pre_hooks and not model[2]._forward_pre_hooks  # no hook left behind


def test_activity_of_a_conv_averages_each_kernel_position_over_the_patches():
    conv = nn.Conv2d(1, 1, 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1.0, -1.0], [2.0, 0.5]]]]))
    x = torch.arange(9.0).reshape(1, 1, 3, 3) - 4  # -4..4
    # the top-left kernel position sees x[0:2, 0:2] = -4, -3, -1, 0 -> mean |x| 2; top-right
    # -3, -2, 0, 1 -> 1.5; bottom-left -1, 0, 2, 3 -> 1.5; bottom-right 0, 1, 3, 4 -> 2
    scores = activity(conv, {"weight": conv.weight}, [(x, None)])["weight"]
    assert torch.allclose(scores, torch.tensor([[[[2.0, 1.5], [3.0, 1.0]]]]))


def test_below_layer_mean_and_streaks_count_consecutive_checks_only():
    masks = {"w": torch.tensor([True, True, True, False])}
    # mean of the active scores (0, 1, 2) is 1: only 0 is below; the inactive one never is
    low = below_layer_mean({"w": torch.tensor([0.0, 1.0, 2.0, 0.0])}, masks)
    assert low["w"].tolist() == [True, False, False, False]
    assert below_layer_mean({"w": torch.tensor([0.0, 1.0, 2.0, 0.0])}, masks, ratio=1.5)["w"].tolist() == [True, True, False, False]
    streaks = Streaks(masks)
    for hits in ([1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 0]):
        streaks.update_({"w": torch.tensor(hits, dtype=torch.bool)})
    assert streaks.counts["w"].tolist() == [3, 1, 2, 0]  # a miss restarts the count
    assert streaks.reached(2)["w"].tolist() == [True, False, True, False]


def _one_neuron(weights=(10.0, 1.0, 1.0, 1.0)):
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([weights]))
    return model


def test_a_connection_goes_exactly_when_its_streak_reaches_patience():
    # input 0 is silent on checks 1, 2, active on check 3 (resets its streak), silent on 4, 5, 6:
    # with patience 3 it is pruned at check 6, not at 3 -- although it has the largest weight
    # (magnitude would keep it) and the schedule's budget allows one removal from check 1 on
    quiet, loud = _batch([0.0, 1.0, 1.0, 1.0]), _batch([5.0, 1.0, 1.0, 1.0])
    batches = [quiet, quiet, loud, quiet, quiet, quiet] + [quiet] * 4
    sp = SynapticPruning(_one_neuron(), sparsity=0.75, total_steps=10, every=1, end=10, patience=3, batches=batches)
    alive = []
    for _ in range(9):
        sp.step()
        alive.append(sp.masks["weight"].reshape(-1).tolist())
    assert all(a == [True] * 4 for a in alive[:5])
    assert alive[5] == [False, True, True, True] and alive[8] == [False, True, True, True]
    # a pruned connection has nothing left to lose (its streak restarts at 0); the equal
    # others are never below their mean
    assert sp.streaks.counts["weight"].reshape(-1).tolist() == [0, 0, 0, 0]
    # the other three are never below their mean (equal activity), so the rule alone stops at
    # 25%; the last check forces the exact target and says how many it forced
    sp.step()
    assert int(sp.masks["weight"].sum()) == keep_count(4, 0.75) == 1
    last = sp.history[-1]
    assert (last["step"], last["removed"], last["forced"], last["sparsity"]) == (10, 0, 2, 0.75)
    assert [h["step"] for h in sp.history] == [6, 10]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))


def _train(sp, model, opt, batches, steps, start=0):
    for t in range(start, start + steps):
        x, y = batches[t % len(batches)]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(160, 20, generator=g)
    x[:, :5] = 0  # five inputs the data never use
    y = torch.randint(0, 5, (160,), generator=g)
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, 160, 32)]


def test_exact_sparsity_at_every_update_within_the_schedule_and_resume():
    batches = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = SynapticPruning(model, opt, sparsity=0.9, total_steps=120, every=5, end="50%", batches=batches)
    _train(sp, model, opt, batches, 40)
    state, weights, opt_state = sp.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict()
    _train(sp, model, opt, batches, 80, start=40)
    total = sum(sp.masks.numel().values())
    pruned = 0
    for h in sp.history:  # every update removes exactly what it planned, never past the schedule's cap
        pruned += h["removed"] + h["forced"]
        assert round(h["sparsity"] * total) == pruned
        assert h["sparsity"] <= h["target"] + 1e-12
        assert h["removed"] <= h["due"]
    assert sum(sp.masks.active().values()) == keep_count(total, 0.9)
    assert sp.history[-1]["step"] == 60
    # inputs the data never use are pruned first: none of them survives in the first layer
    assert not sp.masks["0.weight"][:, :5].any()
    # resume from step 40: the same masks and streaks at the end
    model2 = _mlp()
    model2.load_state_dict(weights)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05)
    opt2.load_state_dict(opt_state)
    sp2 = SynapticPruning(model2, opt2, sparsity=0.9, total_steps=120, every=5, end="50%", batches=batches, takeover=True)
    sp2.load_state_dict(state)
    _train(sp2, model2, opt2, batches, 80, start=40)
    assert all(torch.equal(sp.masks[n], sp2.masks[n]) for n in sp.masks.names())
    assert all(torch.equal(sp.streaks.counts[n], sp2.streaks.counts[n]) for n in sp.masks.names())


def test_registered_for_configs():
    assert METHODS.get("synaptic") is SynapticPruning
    assert SynapticPruning.timing == "during"


@pytest.mark.parametrize("kwargs, words", [
    ({"patience": 0}, ["patience", "consecutive"]),
    ({"patience": 2.5}, ["patience"]),
    ({"ratio": 0.0}, ["ratio", "mean activity"]),
    ({"ratio": float("nan")}, ["ratio"]),
    ({"check_batches": 0}, ["check_batches"]),
    ({"scope": "uniform"}, ["scope", "global"]),
    ({"batches": None}, ["batches", "DataLoader"]),
    ({"patience": 5, "every": 10}, ["patience=5", "lower patience or every"]),
    ({"sparsity": 0.0}, ["sparsity", "prunes nothing"]),
    ({"layer_sparsity": {"0.weight": 0.5}}, ["layer_sparsity", "keep_dense"]),
])
def test_bad_settings_name_the_setting_and_the_fix(kwargs, words):
    settings = dict(sparsity=0.9, total_steps=100, every=5, end="40%", batches=_data())
    settings.update(kwargs)
    with pytest.raises(ConfigError) as err:
        SynapticPruning(_mlp(), **settings)
    for word in words:
        assert word in str(err.value)


def test_a_layer_activity_cannot_read_is_named():
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(4, 2))
    sp = SynapticPruning(model, sparsity=0.5, total_steps=10, every=1, end=10, batches=[(torch.randn(2, 1, 6), None)])
    with pytest.raises(ConfigError, match=r"0\.weight belongs to a Conv1d.*exclude"):
        sp.step()
