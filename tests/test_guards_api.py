"""API guards (issue 20, "never silently wrong"): misuse that used to run quietly now gets one
clear secateurs error (or one warning) naming the problem and the fix."""
import copy
import gc
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import secateurs
from secateurs.errors import CheckpointError, ConfigError, SecateursError, UsageWarning
from secateurs.grow import Grower, GrowPrune, GrowPruneConfig
from secateurs.methods import CTRE, GMP, SET, SNIP, GraNet, LotteryTicket, Magnitude, RigL, SynFlow
from secateurs.models import MLP
from secateurs.structured import prune_to_flops


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))


def cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 3))


def data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g)


# -- 1. the optimizer must own the sparsified parameters -----------------------------------------
def test_an_optimizer_that_does_not_hold_the_prunable_parameters_is_refused():
    model, other = mlp(), mlp()
    with pytest.raises(ConfigError, match=r"the optimizer does not hold 2 of the 2 prunable parameters of Sequential "
                                          r"\(1\.weight, 3\.weight\).*never train.*model\.parameters\(\)"):
        Magnitude(model, torch.optim.SGD(other.parameters(), lr=0.1), sparsity=0.5)
    # only part of them: the missing ones are named
    partial = torch.optim.SGD([model[1].weight, model[1].bias], lr=0.1)
    with pytest.raises(ConfigError, match=r"does not hold 1 of the 2 prunable parameters of Sequential \(3\.weight\)"):
        Magnitude(model, partial, sparsity=0.5)
    # assigning one later is checked the same way (the lottery runner attaches its optimizer so)
    sp = Magnitude(model, None, sparsity=0.5)
    with pytest.raises(ConfigError, match="does not hold 2 of the 2"):
        sp.optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    assert sp.optimizer is None
    sp.optimizer = opt = torch.optim.Adam(model.parameters())
    assert sp.optimizer is opt
    # what stays legitimate: no optimizer, and a frozen parameter the optimizer leaves out
    sp.close()
    model[3].weight.requires_grad_(False)
    Magnitude(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), sparsity=0.5)
    with pytest.raises(ConfigError, match="must be a torch.optim optimizer"):
        Magnitude(mlp(), object(), sparsity=0.5)


# -- 2. one sparsifier per parameter, unless it takes over -----------------------------------------
def test_a_second_sparsifier_on_the_same_parameters_is_refused_unless_it_takes_over():
    model = mlp()
    first = Magnitude(model, sparsity=0.5)
    with pytest.raises(ConfigError, match=r"2 of the 2 prunable parameters of Sequential \(1\.weight, 3\.weight\) are "
                                          r"already managed by Magnitude\(sparsity=0\.5, scope='global'\).*close\(\).*"
                                          r"takeover=True"):
        Magnitude(model, sparsity=0.9)
    # partly overlapping is refused too, naming only the shared ones
    with pytest.raises(ConfigError, match=r"1 of the 1 prunable parameters of Sequential \(3\.weight\)"):
        Magnitude(model, sparsity=0.9, include=["3.weight"])
    second = Magnitude(model, sparsity=0.9, takeover=True)
    assert first.closed and not second.closed
    with pytest.raises(SecateursError, match=r"step\(\) on a closed Magnitude"):
        first.step()
    with pytest.raises(SecateursError, match=r"prune\(\) on a closed Magnitude"):
        first.prune()
    second.prune()
    second.close()
    third = Magnitude(model, sparsity=0.9)  # close() released the parameters
    # another model's parameters are free; a sparsifier that is gone blocks nothing
    Magnitude(mlp(), sparsity=0.5)
    del third
    Magnitude(model, sparsity=0.5)


def test_garbage_and_failed_constructions_do_not_hold_parameters():
    model = mlp()
    x, y = data()
    snip = SNIP(model, batches=[(x, y)], sparsity=0.5)  # holds itself in a cycle (its score is a bound method)
    snip.prune()
    del snip
    fresh = SNIP(model, batches=[(x, y)], sparsity=0.5)  # the uncollected one is collected, not blocking
    del fresh
    gc.collect()
    with pytest.raises(ConfigError, match="keep_dense covers every prunable layer"):
        secateurs.methods.NMSparsifier(model, keep_dense=["*"])  # fails after the base constructor ran
    Magnitude(model, sparsity=0.5)  # the failed one claimed nothing


# -- 3. a state dict of another plan is refused, both plans shown ----------------------------------
def test_a_state_of_another_plan_is_refused_showing_both():
    model = mlp()
    saved = Magnitude(model, sparsity=0.9)
    saved.prune()
    state = saved.state_dict()
    other = mlp()
    with pytest.raises(CheckpointError, match=r"another plan \(sparsity: checkpoint 0\.9, this sparsifier 0\.5\)\. "
                                              r"The checkpoint is for Magnitude\(sparsity=0\.9, scope='global'\); this "
                                              r"sparsifier is Magnitude\(sparsity=0\.5, scope='global'\)"):
        Magnitude(other, sparsity=0.5).load_state_dict(state)
    with pytest.raises(CheckpointError, match=r"scope: checkpoint 'global', this sparsifier 'uniform'"):
        Magnitude(mlp(), sparsity=0.9, scope="uniform").load_state_dict(state)
    with pytest.raises(CheckpointError, match=r"method: checkpoint 'Magnitude', this sparsifier 'Random'"):
        secateurs.Random(mlp(), sparsity=0.9).load_state_dict(state)
    total = 100
    gmp = GMP(mlp(), sparsity=0.9, total_steps=total, every=10).state_dict()
    with pytest.raises(CheckpointError, match=r"schedule: checkpoint 'Cubic\(.*end=50.*this sparsifier 'Cubic\(.*end=75"):
        GMP(mlp(), sparsity=0.9, total_steps=total, every=10, end="75%").load_state_dict(gmp)
    # the same plan loads; a state saved before plans were recorded loads without the check
    same = Magnitude(mlp(), sparsity=0.9)
    same.load_state_dict(state)
    assert same.sparsity == pytest.approx(0.9, abs=0.01)
    legacy = {k: v for k, v in state.items() if k != "plan"}
    Magnitude(mlp(), sparsity=0.5).load_state_dict(legacy)
    # another model is reported as such (the more basic mismatch), not as another plan
    with pytest.raises(CheckpointError, match="different model"):
        Magnitude(cnn(), sparsity=0.5).load_state_dict(state)


# -- 4. step() before any pruning warns once -------------------------------------------------------
def test_step_before_any_pruning_warns_once_when_the_method_prunes_only_on_prune():
    model = mlp()
    sp = Magnitude(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.5)
    with pytest.warns(UsageWarning, match=r"Magnitude\.step\(\) before any pruning.*trains dense.*Call prune\(\) first") as record:
        for _ in range(3):
            sp.step()
    assert sum(issubclass(w.category, UsageWarning) for w in record) == 1
    sp.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UsageWarning)
        pruned = Magnitude(model, sparsity=0.5)
        pruned.prune()
        pruned.step()  # pruned first: silent
        pruned.close()
        GMP(model, sparsity=0.5, total_steps=100, every=10).step()  # has a schedule: silent
        lt = LotteryTicket(model, takeover=True)  # IMP's round 0 trains dense by design: silent
        lt.step()


# -- 5. one convention for data arguments ----------------------------------------------------------
def test_data_arguments_take_a_loader_a_list_or_a_callable_and_refuse_one_shot_iterators():
    x, y = data(16)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)  # not callable: used to fail deep inside SNIP
    masks = {}
    for form, batches in {"loader": loader, "list": [(x[:8], y[:8])], "callable": lambda: loader}.items():
        torch.manual_seed(0)
        sp = SNIP(mlp(), batches=batches, sparsity=0.5)
        sp.prune()
        masks[form] = sp.masks.state_dict()["masks"]
    assert all(torch.equal(masks["loader"][k], masks[f][k]) for f in masks for k in masks[f])
    with pytest.raises(ConfigError, match=r"batches is a one-shot iterator \(generator\).*pass a list"):
        SNIP(mlp(), batches=((a, b) for a, b in loader), sparsity=0.5)
    with pytest.raises(ConfigError, match=r"batches looks like one batch \(tuple of tensors\).*batches=\[batch\]"):
        SNIP(mlp(), batches=(x, y), sparsity=0.5)
    with pytest.raises(ConfigError, match=r"batches\(\) gave a int, not an iterable"):
        SNIP(mlp(), batches=lambda: 3, sparsity=0.5).prune()
    # CTRE (a rule that draws data every update) and the Grower take a loader the same way
    CTRE(mlp(), sparsity=0.5, total_steps=20, every=5, batches=loader)
    model = MLP(16, (4,), 4)
    grower = Grower(model, None, {"net.1": 6}, example_input=x[:2], init="gradmax", start=1, batches=loader)
    grower.step()
    assert grower.finished
    # GrowPrune.event: an iterable (one-shot is fine for one pass) or a callable
    config = GrowPruneConfig(max_params=10_000, add=0, prune=2, usefulness="taylor", depth_ratio=10.0)
    torch.manual_seed(0)
    net = MLP(16, (6, 5), 4)
    records = [GrowPrune(config, example_input=x[:1]).event(net, batches=b)[1]
               for b in (iter(loader), lambda: loader, loader)]
    assert records[0]["widths"] == records[1]["widths"] == records[2]["widths"] and sum(records[0]["pruned"]) == 2


# -- 6. SynFlow with an input shape the model rejects ----------------------------------------------
def test_synflow_with_an_input_shape_the_model_rejects_names_the_shape_and_the_fix():
    model = cnn()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError) as info:
        SynFlow(model, input_shape=(3, 10, 10), rounds=2).prune(0.5)
    message = str(info.value)
    assert message.startswith("synflow input_shape=(3, 10, 10) does not fit Sequential: its all-ones input of shape "
                              "(1, 3, 10, 10)")
    assert "without the batch dimension" in message and "expected input[1, 3, 10, 10] to have 1 channels" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing changed
    SynFlow(model, input_shape=(1, 10, 10), rounds=2, takeover=True).prune(0.5)


# -- 7. prune_to_flops with a wrong input shape: the hint first, no fx trace -----------------------
def test_prune_to_flops_with_a_wrong_input_shape_gives_the_hint_first():
    model = cnn()
    with pytest.raises(ConfigError) as info:
        prune_to_flops(model, torch.randn(2, 3, 10, 10), 0.3)
    message = str(info.value)
    assert message.startswith("example_input of shape (2, 3, 10, 10) does not fit Sequential: pass a batch the model accepts")
    assert "expected input[2, 3, 10, 10] to have 1 channels" in message
    assert "\n" not in message and "ShapeProp" not in message and "While executing" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    prune_to_flops(model, torch.randn(2, 1, 10, 10), 0.3)  # the right shape works


# -- 8. schedule points past the end of training ---------------------------------------------------
@pytest.mark.parametrize("method, kwargs, shown", [
    (RigL, {"end": 200}, r"RigL end=200 is step 200"),
    (RigL, {"end": "3ep", "steps_per_epoch": 50}, r"RigL end='3ep' is step 150"),
    (SET, {"end": "120%"}, r"SET end='120%' is step 120"),
    (GMP, {"end": 101}, r"GMP end=101 is step 101"),
    (GMP, {"start": 150, "end": 200}, r"GMP start=150 is step 150"),
    (GraNet, {"end": 300}, r"GraNet end=300 is step 300"),
    (CTRE, {"every": 10, "end": "2ep", "steps_per_epoch": 60}, r"CTRE end='2ep' is step 120"),
])
def test_schedule_points_past_the_end_of_training_are_refused(method, kwargs, shown):
    extra = {"batches": [data()]} if method is CTRE else {}
    with pytest.raises(ConfigError, match=shown + r", past the end of training \(total_steps=100\).*use a step <= 100"):
        method(mlp(), sparsity=0.5, total_steps=100, **{"every": 10, **kwargs}, **extra)
    # the end of training itself is fine
    method(mlp(), sparsity=0.5, total_steps=100, every=10, end=100, **extra)
