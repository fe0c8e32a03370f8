import pytest

from secateurs.errors import ConfigError
from secateurs.schedules import Constant, Cubic, Geometric, OneShot, cubic_sparsity


def test_cubic_matches_zhu_gupta_eq1():
    s_i, s_f, t0, tf = 0.0, 0.9, 100, 1100
    for t in [100, 350, 600, 1100]:
        expected = s_f + (s_i - s_f) * (1 - (t - t0) / (tf - t0)) ** 3
        assert cubic_sparsity(t, s_i, s_f, t0, tf) == pytest.approx(expected)
    assert cubic_sparsity(0, s_i, s_f, t0, tf) == 0.0
    assert cubic_sparsity(5000, s_i, s_f, t0, tf) == 0.9


def test_cubic_updates_every_interval_and_at_end():
    sched = Cubic(final=0.9, start=10, end=45, every=10, initial=0.5)
    steps = [t for t in range(100) if sched.updates_at(t)]
    assert steps == [10, 20, 30, 40, 45]
    assert sched.sparsity_at(45) == 0.9 and sched.sparsity_at(10) == 0.5
    values = [sched.sparsity_at(t) for t in steps]
    assert values == sorted(values)


def test_geometric_rounds():
    sched = Geometric(rate=0.2, rounds=3, every=100, start=100)
    assert [t for t in range(1000) if sched.updates_at(t)] == [100, 200, 300]
    assert sched.sparsity_at(99) == 0.0
    assert sched.sparsity_at(300) == pytest.approx(1 - 0.8**3)
    assert sched.sparsity_at(999) == pytest.approx(1 - 0.8**3)


def test_one_shot_and_constant():
    assert [t for t in range(10) if OneShot(0.5, at=3).updates_at(t)] == [3]
    assert not any(Constant(0.9).updates_at(t) for t in range(100))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(final=0.9, start=100, end=100, every=10), "start < end"),
        (dict(final=0.9, start=0, end=100, every=500), "longer than the pruning window"),
        (dict(final=1.0, start=0, end=100, every=10), r"\[0, 1\)"),
    ],
)
def test_bad_cubic(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Cubic(**kwargs)
