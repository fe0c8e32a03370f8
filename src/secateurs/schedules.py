"""Sparsity schedules: the target sparsity at optimizer step ``t`` and when to update.

All schedules are step-based: ``t`` counts completed optimizer steps, so resuming from a
checkpoint that stores the step reproduces the schedule exactly. Each is a frozen dataclass
with ``sparsity_at(t)`` and ``updates_at(t)``; the sparsifier prunes at steps where
``updates_at`` is true, to ``sparsity_at``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from .allocation import check_sparsity
from .errors import ConfigError
from .validate import check_int


class Schedule(Protocol):
    def sparsity_at(self, step: int) -> float: ...

    def updates_at(self, step: int) -> bool: ...


def _check_step(value: int, what: str, minimum: int = 0) -> None:
    check_int(value, what, minimum=minimum, hint="it counts optimizer steps")


@dataclass(frozen=True)
class OneShot:
    """Prune once, to ``sparsity``, after step ``at`` (prune-after-training, SNIP at init)."""

    sparsity: float
    at: int = 0

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        _check_step(self.at, "at")

    def sparsity_at(self, step: int) -> float:
        return self.sparsity if step >= self.at else 0.0

    def updates_at(self, step: int) -> bool:
        return step == self.at


@dataclass(frozen=True)
class Constant:
    """Fixed sparsity throughout (sparse-from-scratch: SET, RigL); never prunes further."""

    sparsity: float

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)

    def sparsity_at(self, step: int) -> float:
        return self.sparsity

    def updates_at(self, step: int) -> bool:
        return False


def geometric_sparsity(rate: float, rounds: int) -> float:
    """Sparsity after ``rounds`` rounds that each remove ``rate`` of the remaining weights
    (iterative magnitude pruning, Frankle & Carbin 2019): ``1 - (1 - rate) ** rounds``."""
    return 1.0 - (1.0 - rate) ** rounds


@dataclass(frozen=True)
class Geometric:
    """Every ``every`` steps from ``start``, remove ``rate`` of what remains, ``rounds`` times."""

    rate: float
    rounds: int
    every: int
    start: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.rate < 1.0:
            raise ConfigError(f"rate must be in (0, 1) (fraction of remaining weights pruned per round), got {self.rate!r}")
        _check_step(self.rounds, "rounds", 1)
        _check_step(self.every, "every", 1)
        _check_step(self.start, "start")

    def _rounds_done(self, step: int) -> int:
        if step < self.start:
            return 0
        return min(self.rounds, (step - self.start) // self.every + 1)

    def sparsity_at(self, step: int) -> float:
        return geometric_sparsity(self.rate, self._rounds_done(step))

    def updates_at(self, step: int) -> bool:
        offset = step - self.start
        return offset >= 0 and offset % self.every == 0 and offset // self.every < self.rounds


def cubic_sparsity(step: int, initial: float, final: float, start: int, end: int) -> float:
    """Zhu & Gupta 2017, Eq. 1 (GraNet Eq. 1): ``s_t = s_f + (s_i - s_f)(1 - (t - t0)/(tf - t0))^3``,
    clamped to ``s_i`` before ``t0`` and ``s_f`` after ``tf``. Prunes fast early, when the
    network has redundant weights, and slowly near the end."""
    if step <= start:
        return initial
    if step >= end:
        return final
    progress = (step - start) / (end - start)
    return final + (initial - final) * (1.0 - progress) ** 3


@dataclass(frozen=True)
class Cubic:
    """Gradual pruning from ``initial`` to ``final`` sparsity between steps ``start`` and
    ``end``, updating every ``every`` steps (and at ``end``, so ``final`` is always reached)."""

    final: float
    start: int
    end: int
    every: int
    initial: float = 0.0

    def __post_init__(self) -> None:
        check_sparsity(self.initial, "initial sparsity")
        check_sparsity(self.final, "final sparsity")
        _check_step(self.start, "start")
        _check_step(self.every, "every", 1)
        if self.end <= self.start:
            raise ConfigError(
                f"cubic schedule needs start < end (t0 < tf), got start={self.start}, end={self.end}"
            )
        if self.every > self.end - self.start:
            raise ConfigError(
                f"update interval every={self.every} is longer than the pruning window "
                f"end - start = {self.end - self.start}; use a smaller interval or a longer window"
            )
        if self.final < self.initial:
            raise ConfigError(f"final sparsity {self.final} is below initial {self.initial}")

    def sparsity_at(self, step: int) -> float:
        return cubic_sparsity(step, self.initial, self.final, self.start, self.end)

    def updates_at(self, step: int) -> bool:
        if step < self.start or step > self.end:
            return False
        return (step - self.start) % self.every == 0 or step == self.end


def cosine_drop_fraction(step: int, initial: float, start: int, end: int, minimum: float = 0.0) -> float:
    """Drop fraction decayed by a half cosine from ``initial`` at ``start`` to ``minimum`` at
    ``end`` (RigL, Evci et al. 2020, Eq. 1: ``a/2 (1 + cos(pi t / T_end))``; GraNet's
    regeneration rate 0.5 -> 0.005). Large early swaps explore, small late ones settle."""
    if step <= start:
        return initial
    if step >= end:
        return minimum
    progress = (step - start) / (end - start)
    return minimum + (initial - minimum) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class CosineDropFraction:
    """When to swap connections (drop + regrow) and what fraction of each layer's active
    weights to swap: every ``every`` steps strictly between ``start`` and ``end``, the
    fraction following :func:`cosine_drop_fraction`. ``minimum == initial`` gives a constant
    fraction (SET's zeta)."""

    initial: float
    every: int
    end: int
    start: int = 0
    minimum: float = 0.0

    def __post_init__(self) -> None:
        for what, value in (("drop fraction", self.initial), ("minimum drop fraction", self.minimum)):
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"{what} must be in (0, 1] (the share of active weights swapped), got {value!r}")
        if self.initial <= 0.0:
            raise ConfigError(f"drop fraction must be in (0, 1] (the share of active weights swapped), got {self.initial!r}")
        if self.minimum > self.initial:
            raise ConfigError(f"minimum drop fraction {self.minimum} exceeds the initial {self.initial}")
        _check_step(self.start, "start")
        _check_step(self.every, "every", 1)
        if self.end <= self.start:
            raise ConfigError(f"drop-fraction schedule needs start < end, got start={self.start}, end={self.end}")
        if self.every >= self.end - self.start:
            raise ConfigError(
                f"update interval every={self.every} is not shorter than the update window "
                f"end - start = {self.end - self.start}, so no connection would ever be swapped; "
                "use a smaller interval or train longer"
            )

    def fraction_at(self, step: int) -> float:
        return cosine_drop_fraction(step, self.initial, self.start, self.end, self.minimum)

    def updates_at(self, step: int) -> bool:
        return self.start < step < self.end and (step - self.start) % self.every == 0


def parse_duration(
    value: int | str, *, what: str, total_steps: int | None = None, steps_per_epoch: int | None = None
) -> int:
    """A number of optimizer steps from ``1000`` / ``"1000it"`` (steps), ``"2ep"`` (epochs) or
    ``"75%"`` (of training), so configs can say what the papers say."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected steps like 1000, '1000it', '2ep' or '75%', got {value!r}")
    if isinstance(value, int):
        steps = value
    elif isinstance(value, str):
        text = value.strip().lower()
        unit = next((u for u in ("it", "ep", "%") if text.endswith(u)), "")
        try:
            number = float(text[: len(text) - len(unit)])
        except ValueError:
            raise ConfigError(f"{what}: cannot read {value!r}; write steps like 1000, '1000it', '2ep' or '75%'") from None
        if unit == "ep":
            if steps_per_epoch is None:
                raise ConfigError(f"{what}={value!r} is in epochs but steps_per_epoch was not given; pass it or use steps")
            number *= steps_per_epoch
        elif unit == "%":
            if total_steps is None:
                raise ConfigError(f"{what}={value!r} is a share of training but total_steps was not given")
            number = number / 100.0 * total_steps
        steps = round(number)
    else:
        raise ConfigError(f"{what}: expected steps like 1000, '1000it', '2ep' or '75%', got {value!r}")
    if steps < 0:
        raise ConfigError(f"{what} must not be negative, got {value!r}")
    return steps



def geometric_temperature(step: int, initial: float, final: float, start: int, end: int) -> float:
    """Temperature cooled geometrically (log-linearly) from ``initial`` at ``start`` to
    ``final`` at ``end``: ``T_t = T_0 (T_f / T_0)^((t - t0) / (tf - t0))``, clamped to ``T_0``
    before ``t0`` and ``T_f`` after ``tf`` (simulated annealing's exponential cooling; Gibbs
    pruning raises the inverse temperature along a log-spaced grid, ``logspace(0, 4)``)."""
    if step <= start:
        return initial
    if step >= end:
        return final
    progress = (step - start) / (end - start)
    return initial * (final / initial) ** progress


@dataclass(frozen=True)
class GeometricCooling:
    """An annealing schedule for methods that sample from a temperature-``T`` distribution
    (Gibbs pruning): :func:`geometric_temperature` from ``initial`` to ``final`` between steps
    ``start`` and ``end``. The schedule must cool: ``0 < final < initial``."""

    initial: float
    final: float
    start: int
    end: int

    def __post_init__(self) -> None:
        from .validate import check_number

        for what, value in (("initial temperature", self.initial), ("final temperature", self.final)):
            check_number(value, what, above=0.0, finite=True, hint="temperatures are positive, e.g. initial=1.0, final=1e-3")
        if self.final >= self.initial:
            raise ConfigError(
                f"the temperature schedule never cools: final temperature {self.final:g} >= initial {self.initial:g}, "
                "so the masks would stay random and never settle on the Hamiltonian's minimum; give a final temperature "
                f"below the initial one, e.g. initial={self.initial:g}, final={self.initial * 1e-3:g}"
            )
        _check_step(self.start, "start")
        _check_step(self.end, "end")
        if self.end <= self.start:
            raise ConfigError(f"temperature schedule needs start < end, got start={self.start}, end={self.end}")

    def temperature_at(self, step: int) -> float:
        return geometric_temperature(step, self.initial, self.final, self.start, self.end)
