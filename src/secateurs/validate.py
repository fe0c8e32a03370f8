"""One validator for integer, bool and number settings, with one message format.

Every check raises :class:`~secateurs.errors.ConfigError` saying which setting is wrong, the
value received with its type, and what is accepted::

    train.epochs must be an integer >= 1, got 2.5 (float)
    TrainConfig.amp must be a bool (True or False), got 'yes' (str)
    OptimizerConfig.lr must be a finite number > 0, got 0 (int); use e.g. lr=0.1

Rules shared by all checks:

* ``bool`` is never an integer or a number here: ``True`` is refused where a count, a step or
  a rate is asked (Python would otherwise read it as 1).
* An integer is a Python ``int``; ``3.0`` is refused (a float count is usually a bug upstream,
  e.g. an unrounded ``n * 0.5``). ``numpy=True`` also accepts any :class:`numbers.Integral`
  (numpy integers) -- for the few places that take counts from array code.
* A number is an ``int`` or a ``float`` (numpy's ``float64`` is a ``float``); ``numpy=True``
  also accepts any :class:`numbers.Real` (e.g. ``numpy.float32``, numpy integers).
* Bounds: ``minimum`` / ``maximum`` are inclusive, ``above`` / ``below`` exclusive.
  ``optional=True`` also accepts ``None`` (and says so in the message).
* ``hint`` is appended after ``; `` -- how to fix it, or what the setting means.

Each check returns the value unchanged so it can be used inline.
"""
from __future__ import annotations

import numbers
from typing import Any

from .errors import ConfigError

__all__ = ["check_bool", "check_int", "check_number", "describe", "is_int", "is_number"]


def describe(value: Any) -> str:
    """``2.5 (float)``: the value received and its type, as every message shows it."""
    return f"{value!r} ({type(value).__name__})"


def _fmt(bound: Any) -> str:
    return repr(bound) if isinstance(bound, str) else f"{bound:g}" if isinstance(bound, float) else str(bound)


def _bounds(minimum: Any, maximum: Any, above: Any, below: Any) -> str:
    """`` >= 1``, `` < 5``, `` in [0, 1)``, or ``""`` for no bounds."""
    if minimum is not None and above is not None or maximum is not None and below is not None:
        raise TypeError("give at most one lower bound (minimum or above) and one upper bound (maximum or below)")
    low = ("[", minimum) if minimum is not None else ("(", above) if above is not None else None
    high = ("]", maximum) if maximum is not None else (")", below) if below is not None else None
    if low and high:
        return f" in {low[0]}{_fmt(low[1])}, {_fmt(high[1])}{high[0]}"
    if low:
        return f" {'>=' if low[0] == '[' else '>'} {_fmt(low[1])}"
    if high:
        return f" {'<=' if high[0] == ']' else '<'} {_fmt(high[1])}"
    return ""


def _in_bounds(value: Any, minimum: Any, maximum: Any, above: Any, below: Any) -> bool:
    # written so that NaN fails every bound
    return (
        (minimum is None or value >= minimum)
        and (above is None or value > above)
        and (maximum is None or value <= maximum)
        and (below is None or value < below)
    )


def _fail(what: str, accepted: str, value: Any, optional: bool, hint: str | None) -> ConfigError:
    accepted = f"None or {accepted}" if optional else accepted
    return ConfigError(f"{what} must be {accepted}, got {describe(value)}" + (f"; {hint}" if hint else ""))


def is_int(value: Any, *, numpy: bool = False) -> bool:
    """True for an integer (never a bool; numpy integers only with ``numpy=True``)."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral if numpy else int)


def is_number(value: Any, *, numpy: bool = False) -> bool:
    """True for an int or a float (never a bool; any real number with ``numpy=True``)."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real if numpy else (int, float))


def check_int(
    value: Any,
    what: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    above: int | None = None,
    below: int | None = None,
    optional: bool = False,
    numpy: bool = False,
    hint: str | None = None,
) -> Any:
    """``value`` if it is an integer within the bounds, else :class:`ConfigError`."""
    accepted = "an integer" + _bounds(minimum, maximum, above, below)
    if optional and value is None:
        return value
    if not is_int(value, numpy=numpy) or not _in_bounds(value, minimum, maximum, above, below):
        raise _fail(what, accepted, value, optional, hint)
    return value


def check_number(
    value: Any,
    what: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    finite: bool = False,
    optional: bool = False,
    numpy: bool = False,
    hint: str | None = None,
) -> Any:
    """``value`` if it is an int or float within the bounds (and finite, with ``finite=True``),
    else :class:`ConfigError`. NaN fails any bound."""
    accepted = ("a finite number" if finite else "a number") + _bounds(minimum, maximum, above, below)
    if optional and value is None:
        return value
    ok = is_number(value, numpy=numpy) and _in_bounds(value, minimum, maximum, above, below)
    if ok and finite:
        ok = abs(value) < float("inf")  # False for inf and NaN
    if not ok:
        raise _fail(what, accepted, value, optional, hint)
    return value


def check_bool(value: Any, what: str, *, optional: bool = False, hint: str | None = None) -> Any:
    """``value`` if it is ``True`` or ``False`` (not 0/1, not "yes"), else :class:`ConfigError`."""
    if optional and value is None:
        return value
    if not isinstance(value, bool):
        raise _fail(what, "a bool (True or False)", value, optional, hint)
    return value
