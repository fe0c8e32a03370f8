"""The one validator for integer / bool / number settings (secateurs.validate)."""
import math

import numpy as np
import pytest
import torch

from secateurs.errors import ConfigError
from secateurs.validate import check_bool, check_int, check_number, describe


def message(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as e:
        fn(*args, **kwargs)
    return str(e.value)


def test_the_one_format_names_setting_value_type_and_what_is_accepted():
    assert message(check_int, 2.5, "train.epochs", minimum=1) == "train.epochs must be an integer >= 1, got 2.5 (float)"
    assert message(check_int, "3", "seed") == "seed must be an integer, got '3' (str)"
    assert message(check_bool, "yes", "amp") == "amp must be a bool (True or False), got 'yes' (str)"
    assert (message(check_number, 0, "lr", above=0, finite=True, hint="use e.g. 0.1")
            == "lr must be a finite number > 0, got 0 (int); use e.g. 0.1")
    assert message(check_int, 0, "n", optional=True, minimum=1) == "n must be None or an integer >= 1, got 0 (int)"
    assert describe(np.int64(3)) == "np.int64(3) (int64)"


@pytest.mark.parametrize("kwargs,text", [
    (dict(minimum=0), ">= 0"), (dict(above=0), "> 0"), (dict(maximum=5), "<= 5"), (dict(below=5), "< 5"),
    (dict(minimum=0, below=1), "in [0, 1)"), (dict(above=0, below=1), "in (0, 1)"),
    (dict(minimum=0.0, maximum=1.0), "in [0, 1]"), (dict(above=0.5, maximum=2), "in (0.5, 2]"),
])
def test_bounds_are_written_as_accepted(kwargs, text):
    assert f"must be a number {text}, got" in message(check_number, "x", "v", **kwargs)


def test_conflicting_bounds_are_a_programming_error():
    with pytest.raises(TypeError):
        check_int(1, "n", minimum=0, above=0)
    with pytest.raises(TypeError):
        check_number(1, "n", maximum=0, below=0)


def test_integers_within_bounds_pass_and_are_returned_unchanged():
    assert check_int(0, "n") == 0
    assert check_int(-7, "n") == -7
    assert check_int(1, "n", minimum=1) == 1
    assert check_int(5, "n", maximum=5) == 5
    assert check_int(4, "n", minimum=0, below=5) == 4
    assert check_int(None, "n", optional=True) is None
    big = 2**70
    assert check_int(big, "n", minimum=0) is big


@pytest.mark.parametrize("value,kwargs", [
    (0, dict(minimum=1)), (6, dict(maximum=5)), (5, dict(below=5)), (0, dict(above=0)), (-1, dict(minimum=0, below=3)),
])
def test_integers_out_of_bounds_are_refused(value, kwargs):
    assert f"got {value} (int)" in message(check_int, value, "n", **kwargs)


@pytest.mark.parametrize("value", [True, False, 3.0, 2.5, "3", None, [1], math.nan, np.int64(3), np.True_, torch.tensor(3)])
def test_only_python_ints_are_integers_by_default(value):
    # bool is never an int here, and 3.0 is refused as no check accepted it before
    assert "must be an integer" in message(check_int, value, "n")


def test_numpy_integers_pass_only_where_asked_and_bools_never():
    assert check_int(np.int64(3), "n", numpy=True, minimum=0) == 3
    assert check_int(np.uint8(3), "n", numpy=True) == 3
    for value in (True, np.True_, 3.0, np.float32(3)):
        with pytest.raises(ConfigError):
            check_int(value, "n", numpy=True)
    assert "got np.int64(-1) (int64)" in message(check_int, np.int64(-1), "n", numpy=True, minimum=0)


def test_numbers_are_int_or_float_never_bool():
    assert check_number(1, "x") == 1
    assert check_number(0.5, "x", minimum=0, below=1) == 0.5
    assert check_number(np.float64(0.5), "x", minimum=0) == 0.5  # float64 is a float
    assert check_number(math.inf, "x", minimum=0) == math.inf  # not finite=True: allowed
    assert check_number(math.nan, "x") is not None  # no bound, not finite=True: allowed
    for value in (True, False, "0.5", None, np.float32(0.5), torch.tensor(0.5), 1j):
        assert "must be a number" in message(check_number, value, "x")


def test_nan_fails_every_bound_and_finite_refuses_inf():
    for kwargs in (dict(minimum=0), dict(above=0), dict(maximum=1), dict(below=1)):
        with pytest.raises(ConfigError):
            check_number(math.nan, "x", **kwargs)
    for value in (math.inf, -math.inf, math.nan):
        assert "must be a finite number" in message(check_number, value, "x", finite=True)
    assert check_number(1e308, "x", finite=True) == 1e308


def test_numpy_reals_pass_only_where_asked():
    assert check_number(np.float32(0.25), "d", numpy=True, minimum=0, maximum=1) == np.float32(0.25)
    assert check_number(np.int32(1), "d", numpy=True, minimum=0, maximum=1) == 1
    with pytest.raises(ConfigError):
        check_number(np.True_, "d", numpy=True)
    with pytest.raises(ConfigError):
        check_number(True, "d", numpy=True)


def test_bools_are_true_or_false_only():
    assert check_bool(True, "amp") is True
    assert check_bool(False, "amp") is False
    assert check_bool(None, "amp", optional=True) is None
    for value in (0, 1, "true", None, np.True_, 1.0):
        assert "must be a bool (True or False)" in message(check_bool, value, "amp")
