"""PNAS (search.pnas): the surrogate, rank correlation, the propose / observe loop, budgets,
determinism and resume, on a synthetic accuracy with a known optimum (no training)."""
import hashlib
import math
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import torch

from secateurs.errors import ConfigError
from secateurs.search.pnas import PNAS, IndicatorFeatures, Surrogate, indicator_features, rank_correlation
from secateurs.search.space import Architecture, Block, InputShape, SearchSpace

SPACE = SearchSpace(ops=("conv3", "dwsep5"), conv_widths=(8, 32), fc_widths=(32, 64), max_conv=3, max_fc=1)
SHAPE = InputShape(1, 28, 10)
OPTIMUM = Architecture((Block("dwsep5", 32), Block("dwsep5", 32, True), Block("dwsep5", 32), Block("fc", 64)))


def every_architecture(space=SPACE, shape=SHAPE):
    out, frontier = [], space.roots(shape)
    while frontier:
        out += frontier
        frontier = [child for arch in frontier for child in space.expand(arch, shape)]
    return out


def synthetic_accuracy(arch: Architecture) -> float:
    """A hidden rule: dwsep5 beats conv3, wider is better, a pool helps only at position 1,
    consecutive dwsep5 blocks interact, an fc-64 head helps; plus a small label-hashed jitter
    so the function is not exactly what the features encode. Longer good chains win, so the
    optimum is OPTIMUM (checked by enumeration below)."""
    acc = 0.3
    conv = arch.conv_blocks
    for i, b in enumerate(conv):
        acc += 0.06 if b.op == "dwsep5" else 0.02
        acc += 0.02 * math.log2(b.width) / 5
        if b.pool:
            acc += 0.03 if i == 1 else -0.02
        if i > 0 and b.op == conv[i - 1].op == "dwsep5":
            acc += 0.01
    for b in arch.fc_blocks:
        acc += 0.02 + (0.02 if b.width == 64 else 0.0)
    jitter = int.from_bytes(hashlib.blake2b(arch.label.encode(), digest_size=4).digest(), "little") / 2**32
    return acc + 0.004 * (jitter - 0.5)


def run(search: PNAS, accuracy=synthetic_accuracy, after_level=None):
    while not search.done:
        candidates = search.propose()
        if not candidates:
            break
        search.observe({arch: accuracy(arch) for arch in candidates})
        if after_level is not None:
            after_level(search)
    return search


# --- rank correlation ----------------------------------------------------------------------------

def test_spearman_and_kendall_match_scipy_with_ties():
    rng = np.random.default_rng(0)
    for n in (2, 5, 30, 200):
        a = rng.integers(0, 6, n).astype(float)  # many ties
        b = a + rng.integers(0, 4, n)
        assert rank_correlation(a, b) == pytest.approx(scipy.stats.spearmanr(a, b).statistic, abs=1e-12)
        assert rank_correlation(a, b, method="kendall") == pytest.approx(scipy.stats.kendalltau(a, b).statistic,
                                                                        abs=1e-12)
        c = rng.normal(size=n)
        assert rank_correlation(c, -c) == pytest.approx(-1.0)
    assert math.isnan(rank_correlation([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert math.isnan(rank_correlation([1.0], [2.0]))
    assert rank_correlation(torch.tensor([1.0, 2.0, 3.0]), [3, 5, 9]) == pytest.approx(1.0)


@pytest.mark.parametrize("a, b, match", [
    ([1.0, 2.0], [1.0], "equal length"),
    ([1.0, float("nan")], [1.0, 2.0], "NaN"),
    ([[1.0, 2.0]], [[1.0, 2.0]], "one-dimensional"),
])
def test_rank_correlation_refuses_bad_inputs(a, b, match):
    with pytest.raises(ConfigError, match=match):
        rank_correlation(a, b)
    with pytest.raises(ConfigError, match="spearman"):
        rank_correlation([1.0, 2.0], [1.0, 2.0], method="pearson")


# --- the surrogate -------------------------------------------------------------------------------

def test_surrogate_fits_ranks_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 4, generator=g, dtype=torch.float64)
    y = x[:, 0] - 0.5 * x[:, 1] ** 2 + 0.3 * x[:, 2] * x[:, 3]
    xt = torch.randn(200, 4, generator=g, dtype=torch.float64)
    yt = xt[:, 0] - 0.5 * xt[:, 1] ** 2 + 0.3 * xt[:, 2] * xt[:, 3]
    first = Surrogate(seed=3).fit(x, y)
    mean, std = first.predict(xt)
    assert mean.dtype == torch.float64 and mean.shape == std.shape == (200,)
    assert (std > 0).all()  # the members differ (folds and initialisation)
    assert rank_correlation(mean, yt) > 0.8
    again, _ = Surrogate(seed=3).fit(x, y).predict(xt)
    assert torch.equal(mean, again)
    other, _ = Surrogate(seed=4).fit(x, y).predict(xt)
    assert not torch.equal(mean, other)
    boot, _ = Surrogate(seed=3, resample="bootstrap", loss="mse").fit(x, y).predict(xt)
    assert rank_correlation(boot, yt) > 0.8
    single = Surrogate(members=1, seed=0).fit(x[:1], y[:1])  # one sample, one member: still defined
    assert torch.isfinite(single.predict(xt)[0]).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"members": 0}, "surrogate members must be an integer >= 1"),
    ({"steps": 0}, "surrogate steps"),
    ({"lr": 0}, "surrogate lr"),
    ({"weight_decay": -1.0}, "surrogate weight_decay"),
    ({"hidden": 64}, "surrogate hidden must be a list"),
    ({"hidden": (64, 0)}, "surrogate hidden width"),
    ({"loss": "huber"}, "surrogate loss"),
    ({"resample": "jackknife"}, "surrogate resample"),
])
def test_surrogate_refuses_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Surrogate(**kwargs)


def test_surrogate_refuses_bad_data():
    s = Surrogate()
    with pytest.raises(ConfigError, match="not been fitted"):
        s.predict(torch.zeros(1, 3))
    with pytest.raises(ConfigError, match="one accuracy per candidate"):
        s.fit(torch.zeros(3, 2), torch.zeros(2))
    with pytest.raises(ConfigError, match="NaN"):
        s.fit(torch.zeros(2, 2), torch.tensor([0.0, float("nan")]))
    s.fit(torch.randn(4, 2), torch.randn(4))
    with pytest.raises(ConfigError, match="fitted on 2 features but got 3"):
        s.predict(torch.zeros(1, 3))


# --- the search ----------------------------------------------------------------------------------

def test_pnas_finds_the_optimum_and_its_surrogate_learns_to_rank():
    everything = every_architecture()
    assert max(everything, key=synthetic_accuracy) == OPTIMUM
    g = torch.Generator().manual_seed(1)
    held = list(dict.fromkeys(SPACE.sample(g, SHAPE) for _ in range(300)))
    predictions = []
    search = run(PNAS(SPACE, SHAPE, k=8, seed=0), after_level=lambda s: predictions.append(s.predict(held)[0]))

    assert search.stopped == "reached 4 blocks, the longest chain searched" and search.done
    assert [level.level for level in search.history] == [1, 2, 3, 4]
    assert len(search.history[0].proposed) == len(SPACE.roots(SHAPE)) == 10  # level 1 trains every root
    assert all(len(level.proposed) == 8 for level in search.history[1:])
    assert search.best()[0] == (OPTIMUM, synthetic_accuracy(OPTIMUM))
    assert search.trained == 34 < len(everything) / 40  # 34 trained of 1562

    # rank correlation on held-out candidates (never trained) rises level by level
    unseen = [i for i, arch in enumerate(held) if arch not in search.observed]
    truth = [synthetic_accuracy(held[i]) for i in unseen]
    rho = [rank_correlation(p[unseen], truth) for p in predictions]
    assert rho[0] < 0.6 and rho[-1] > 0.9 and rho[-1] > rho[0] + 0.3, rho

    # the history keeps the predictions made before the accuracies were seen
    assert search.history[0].predicted is None and search.history[0].rank_correlation is None
    for level in search.history[1:]:
        assert len(level.predicted) == len(level.accuracies) == len(level.proposed)
        assert list(level.predicted) == sorted(level.predicted, reverse=True)
        assert -1.0 <= level.rank_correlation <= 1.0
        row = level.to_dict()
        assert row["labels"] == [a.label for a in level.proposed]
        assert [Architecture.from_dict(d) for d in row["proposed"]] == list(level.proposed)


def test_same_seed_same_proposals_and_replay_resumes():
    settings = dict(k=5, seed=7, first_level=6, surrogate={"steps": 150})
    first = run(PNAS(SPACE, SHAPE, **settings))
    second = run(PNAS(SPACE, SHAPE, **settings))
    assert [lv.proposed for lv in first.history] == [lv.proposed for lv in second.history]
    assert [lv.predicted for lv in first.history] == [lv.predicted for lv in second.history]
    assert len(first.history[0].proposed) == 6  # first_level: a deterministic subset of the 10 roots
    other = run(PNAS(SPACE, SHAPE, **{**settings, "seed": 8}))
    assert [lv.proposed for lv in other.history] != [lv.proposed for lv in first.history]

    # a run interrupted after two levels: a fresh search replays the stored accuracies
    stored = {a: acc for lv in first.history[:2] for a, acc in zip(lv.proposed, lv.accuracies)}
    resumed = PNAS(SPACE, SHAPE, **settings)
    assert resumed.replay(stored) == 2 and resumed.level == 3
    assert resumed.propose() == list(first.history[2].proposed)
    assert resumed.propose() == list(first.history[2].proposed)  # idempotent until observed
    run(resumed)
    assert [lv.proposed for lv in resumed.history] == [lv.proposed for lv in first.history]
    assert [lv.predicted for lv in resumed.history] == [lv.predicted for lv in first.history]
    assert resumed.best() == first.best()
    # replaying everything reproduces the whole search; observe() accepts any mapping order
    full = PNAS(SPACE, SHAPE, **settings)
    assert full.replay(dict(reversed(list(first.observed.items())))) == len(first.history)
    assert full.propose() == [] and full.done


def test_budget_filter_is_never_violated():
    def small(arch):  # at most 16 channels after the first block, and no fc-64
        return all(b.width <= 16 for b in arch.conv_blocks[1:]) and all(b.width < 64 for b in arch.fc_blocks)

    search = run(PNAS(SPACE, SHAPE, k=6, seed=0, admits=small, surrogate={"steps": 150}))
    proposed = [a for lv in search.history for a in lv.proposed]
    assert proposed and all(small(a) for a in proposed)
    assert all(lv.rejected > 0 for lv in search.history)  # fc-64 is refused at every level
    best = search.best()[0][0]
    assert small(best) and len(best) == 4


def test_budget_that_refuses_everything():
    with pytest.raises(ConfigError, match="admits refuses all 10 one-block candidates.*loosen the budget"):
        PNAS(SPACE, SHAPE, k=4, seed=0, admits=lambda arch: False).propose()
    # children all refused: the search ends early and says so
    search = run(PNAS(SPACE, SHAPE, k=4, seed=0, admits=lambda arch: len(arch) <= 2, surrogate={"steps": 50}))
    assert search.done and len(search.history) == 2
    assert "level 3: admits refused all" in search.stopped and "ended early at level 2" in search.stopped
    with pytest.raises(ConfigError, match="must return True or False"):
        PNAS(SPACE, SHAPE, k=4, seed=0, admits=lambda arch: 1).propose()


def test_a_space_that_cannot_grow_stops():
    space = SearchSpace(ops=("conv3",), conv_widths=(8,), max_conv=0, max_fc=1)
    search = run(PNAS(space, SHAPE, k=2, seed=0))
    assert len(search.history) == 1 and search.stopped.startswith("reached 1 blocks")
    search.observe({})  # the plain loop's last round: nothing proposed, nothing observed
    with pytest.raises(ConfigError, match="the search is done"):
        search.observe({search.best()[0][0]: 0.5})


def test_extra_features_are_appended_and_checked():
    def hint(arch):  # an oracle feature
        return torch.tensor([synthetic_accuracy(arch)])

    search = PNAS(SPACE, SHAPE, k=4, seed=0, features=hint, levels=2, surrogate={"steps": 100})
    arch = SPACE.roots(SHAPE)[0]
    assert search.features(arch).shape == (len(SPACE.feature_names()) + 1,)
    run(search)
    assert search.history[-1].rank_correlation > 0.5
    for bad, match in [(lambda a: torch.tensor([math.inf]), "finite"),
                       (lambda a: torch.zeros(2, 2), "1-D"),
                       (lambda a: "x", "1-D tensor")]:
        with pytest.raises(ConfigError, match=match):
            PNAS(SPACE, SHAPE, k=4, seed=0, features=bad).features(arch)
    widths = iter([1, 2])
    varying = PNAS(SPACE, SHAPE, k=4, seed=0, features=lambda a: torch.zeros(next(widths)))
    varying.features(SPACE.roots(SHAPE)[0])
    with pytest.raises(ConfigError, match="same number of features"):
        varying.features(SPACE.roots(SHAPE)[1])


def test_indicator_features_are_finite_and_deterministic():
    inputs = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    features = IndicatorFeatures(SHAPE, inputs, seed=0)
    arch = Architecture((Block("conv3", 8, True), Block("fc", 32)))
    x = features(arch)
    assert x.shape == (2,) and torch.isfinite(x).all() and 0 < x[1] <= 1
    assert torch.equal(IndicatorFeatures(SHAPE, inputs, seed=0)(arch), x)
    assert features(arch) is x  # cached
    with pytest.raises(ConfigError, match=r"indicator inputs must be a batch \[n >= 2, 1, 28, 28\]"):
        IndicatorFeatures(SHAPE, torch.zeros(4, 3, 28, 28))
    with pytest.raises(ConfigError, match="indicator region_inputs must be a batch"):
        IndicatorFeatures(SHAPE, inputs, region_inputs=torch.zeros(4, 28, 28))
    noise = indicator_features(SHAPE, seed=0, batch=4, region_batch=16)  # no data: seeded noise images
    assert noise.inputs.shape == (4, 1, 28, 28) and noise.region_inputs.shape == (16, 1, 28, 28)
    assert torch.equal(noise.inputs, indicator_features(SHAPE, seed=0, batch=4).inputs)
    assert indicator_features(SHAPE, inputs).inputs is inputs
    with pytest.raises(ConfigError, match="indicator batch must be an integer >= 2"):
        indicator_features(SHAPE, batch=1)

    # plugged into a search over a tiny space (4 roots, 4 children): the features travel along
    space = SearchSpace(ops=("conv3",), conv_widths=(8,), fc_widths=(16, 32), max_conv=1, max_fc=1)
    regions = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with_indicators = IndicatorFeatures(SHAPE, inputs, region_inputs=regions, seed=0)
    search = run(PNAS(space, SHAPE, k=3, seed=0, features=with_indicators, surrogate={"steps": 50}))
    assert [len(lv.proposed) for lv in search.history] == [4, 3]
    assert len(with_indicators._cache) == 4 + 4  # every root and every ranked child, each measured once
    assert search.features(search.history[1].proposed[0]).shape == (len(space.feature_names()) + 2,)


@pytest.mark.parametrize("kwargs, match", [
    ({"k": 0}, "pnas k must be an integer >= 1"),
    ({"k": 2.0}, "pnas k must be an integer"),
    ({"surrogate": {"members": 0}}, "surrogate members"),
    ({"surrogate": {"member": 3}}, "pnas surrogate: .*members, hidden"),
    ({"surrogate": {"seed": 3}}, "take no seed"),
    ({"first_level": 0}, "pnas first_level"),
    ({"levels": 5}, "pnas levels.*at most 4 blocks"),
    ({"admits": "small"}, "pnas admits must be a function"),
    ({"features": 3}, "pnas features must be a function"),
    ({"seed": None}, "pnas seed"),
    ({"space": "tiny"}, "space must be a SearchSpace"),
])
def test_pnas_refuses_bad_settings(kwargs, match):
    settings = {"space": SPACE, "shape": SHAPE, "k": 4, "seed": 0, **kwargs}
    with pytest.raises(ConfigError, match=match):
        PNAS(settings.pop("space"), settings.pop("shape"), **settings)


def test_observe_needs_exactly_the_proposed_candidates():
    search = PNAS(SPACE, SHAPE, k=4, seed=0)
    roots = search.propose()
    results = {a: 0.5 for a in roots}
    with pytest.raises(ConfigError, match="missing: " + roots[0].label.replace(".", r"\.")):
        search.observe({a: 0.5 for a in roots[1:]})
    with pytest.raises(ConfigError, match="not proposed: conv3-8.conv3-8"):
        search.observe({**results, Architecture((Block("conv3", 8), Block("conv3", 8))): 0.1})
    with pytest.raises(ConfigError, match="accuracy of .* finite number"):
        search.observe({**results, roots[0]: float("nan")})
    with pytest.raises(ConfigError, match="mapping"):
        search.observe(list(roots))
    search.observe(results)
    assert search.level == 2 and search.trained == len(roots)


def test_pnas_imports_only_the_library_layer():
    code = (
        "import sys, numpy, torch\n"
        "before = set(sys.modules)\n"
        "import secateurs.search.pnas\n"
        "bad = [m for m in ('secateurs.data', 'secateurs.models', 'secateurs.train', 'secateurs.experiments',\n"
        "                   'secateurs.cli', 'scipy', 'tqdm', 'matplotlib', 'yaml')\n"
        "       if m in sys.modules and m not in before]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"search.pnas imported {out}"


def test_the_plain_loop_ends_cleanly_and_observing_after_the_end_is_refused():
    from secateurs.search.space import InputShape as _Shape, SearchSpace as _Space

    space = _Space(ops=("conv3",), conv_widths=(8,), fc_widths=(16,), max_conv=1, max_fc=1)
    search = PNAS(space, _Shape(1, 8, 3), k=2, seed=0)
    while not search.done:  # the README's loop: the last propose() is empty and ends the search
        candidates = search.propose()
        search.observe({a: 0.1 * len(a) for a in candidates})
    assert search.trained == 3 + 2 and search.stopped  # 3 roots (conv3-8, conv3-8p, fc-16), then 2 children
    with pytest.raises(ConfigError, match="nothing to observe"):
        search.observe({search.best()[0][0]: 0.5})
