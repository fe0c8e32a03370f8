"""Sparsity schedules: the target sparsity at optimizer step ``t`` and when to update.

All schedules are step-based: ``t`` counts completed optimizer steps, so resuming from a
checkpoint that stores the step reproduces the schedule exactly. Each is a frozen dataclass
with ``sparsity_at(t)`` and ``updates_at(t)``; the sparsifier prunes at steps where
``updates_at`` is true, to ``sparsity_at``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .allocation import check_sparsity
from .errors import ConfigError


class Schedule(Protocol):
    def sparsity_at(self, step: int) -> float: ...

    def updates_at(self, step: int) -> bool: ...


def _check_step(value: int, what: str, minimum: int = 0) -> None:
    if not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{what} must be an integer step >= {minimum}, got {value!r}")


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


SCHEDULES: dict[str, type] = {"one_shot": OneShot, "constant": Constant, "geometric": Geometric, "cubic": Cubic}


def build_schedule(name: str, **params) -> Schedule:
    """A schedule from its config name and fields; unknown names / fields list the known ones."""
    from dataclasses import fields

    from .errors import UnknownNameError

    if name not in SCHEDULES:
        raise UnknownNameError(f"unknown schedule {name!r}; known schedules: {', '.join(SCHEDULES)}")
    cls = SCHEDULES[name]
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(f"schedule {name!r} has no field(s) {unknown}; its fields are: {', '.join(known)}")
    return cls(**params)
