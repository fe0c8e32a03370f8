"""Pruning during training: gradual magnitude pruning, dynamic sparse training, GraNet.

Each method is a recipe over the shared parts (score, allocation, schedules, regrowth):

| method | initial mask | sparsity schedule | drop | grow | swap schedule |
|---|---|---|---|---|---|
| GMP    | dense                | cubic, global/uniform | -         | -         | - |
| SET    | random ERK           | constant              | magnitude | random    | cosine drop fraction |
| RigL   | random ERK           | constant              | magnitude | gradient  | cosine, stops at 75% |
| GraNet | dense or random ERK  | cubic, global         | magnitude | gradient  | cosine 0.5 -> 0.005 to the end |
| CTRE   | random ERK           | constant              | magnitude | cosine (+ random) | constant zeta every epoch |

Durations (``start``, ``end``, ``every``) read as steps (``1000`` / ``"1000it"``), epochs
(``"2ep"``, needs ``steps_per_epoch``) or shares of training (``"75%"``); a point past
``total_steps`` is refused.
"""
from __future__ import annotations

from ..errors import ConfigError
from ..regrowth import REGROWTH, CosineRegrowth, GradientRegrowth, RandomRegrowth
from ..schedules import Constant, CosineDropFraction, Cubic, parse_duration
from ..scores import magnitude
from .base import Sparsifier
from .registry import METHODS


class _DuringTraining(Sparsifier):
    """Shared constructor plumbing: the training length and duration parsing."""

    timing = "during"

    def _steps(self, value, what: str) -> int:
        """Steps of a schedule point (``start`` / ``end`` / ``every``); a point past the end
        of training is refused: the schedule would never reach it (the target sparsity or the
        last swap would silently not happen)."""
        steps = parse_duration(value, what=what, total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch)
        if steps > self.total_steps and what != "every":  # (the schedules bound every by end - start)
            raise ConfigError(
                f"{type(self).__name__} {what}={value!r} is step {steps}, past the end of training "
                f"(total_steps={self.total_steps}), so the schedule would never get there; use a step "
                f"<= {self.total_steps} or a share of training such as '75%'"
            )
        return steps

    def _rule(self, regrowth: str | None, default: type):
        """The regrowth rule named by ``regrowth`` (``prune.params.regrowth``: a name of
        :data:`secateurs.regrowth.REGROWTH`), or the method's own."""
        if regrowth is None:
            return default()
        if not isinstance(regrowth, str):
            raise ConfigError(f"{type(self).__name__} regrowth must be a rule name ({', '.join(REGROWTH.names())}), "
                              f"got {regrowth!r}")
        return REGROWTH.get(regrowth)()

    def _length(self, total_steps: int, steps_per_epoch: int | None) -> None:
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ConfigError(f"total_steps must be the number of training steps (>= 1), got {total_steps!r}")
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch


@METHODS.register("gmp", "gradual magnitude pruning, cubic schedule (Zhu & Gupta 2017)")
class GMP(_DuringTraining):
    """Gradual magnitude pruning (Zhu & Gupta 2017; Gale et al. 2019): from dense to
    ``sparsity`` along the cubic schedule between ``start`` and ``end``, every ``every`` steps.
    Pruning early while the learning rate is high lets the network recover (GraNet prunes up
    to the first learning-rate decay)."""

    def __init__(self, model, optimizer=None, *, sparsity: float, total_steps: int, steps_per_epoch: int | None = None,
                 start="0it", end="50%", every=100, scope: str = "global", **kwargs):
        self._length(total_steps, steps_per_epoch)
        schedule = Cubic(final=sparsity, start=self._steps(start, "start"), end=self._steps(end, "end"),
                         every=self._steps(every, "every"))
        super().__init__(model, optimizer, score=magnitude, sparsity=sparsity, scope=scope, schedule=schedule, **kwargs)


def _swap_schedule(self: _DuringTraining, drop_fraction: float, every, end, start="0it", minimum: float = 0.0):
    return CosineDropFraction(
        initial=drop_fraction, every=self._steps(every, "every"), start=self._steps(start, "start"),
        end=self._steps(end, "end"), minimum=minimum,
    )


class _ConstantSparsitySwaps(_DuringTraining):
    """SET and RigL share everything but the regrowth rule: a random ERK mask at the target
    sparsity, then every ``every`` steps until ``end`` a swap of ``drop_fraction``
    (cosine-decayed to ``drop_fraction_min``) of each layer's smallest-magnitude weights,
    regrown by the class's rule or the one ``regrowth`` names (random, gradient, cosine)."""

    rule: type = RandomRegrowth

    def __init__(self, model, optimizer=None, *, sparsity: float, total_steps: int, steps_per_epoch: int | None = None,
                 drop_fraction: float = 0.3, drop_fraction_min: float = 0.0, every=100, end="75%",
                 scope: str = "erk", regrowth: str | None = None, **kwargs):
        self._length(total_steps, steps_per_epoch)
        super().__init__(
            model, optimizer, score=magnitude, sparsity=sparsity, scope=scope, schedule=Constant(sparsity),
            initial_sparsity=sparsity, initial_scope=scope, regrowth=self._rule(regrowth, self.rule),
            swap_schedule=_swap_schedule(self, drop_fraction, every, end, minimum=drop_fraction_min), **kwargs,
        )


@METHODS.register("set", "sparse evolutionary training: ERK mask, drop |w|, regrow random (Mocanu et al. 2018)")
class SET(_ConstantSparsitySwaps):
    """SET (Mocanu et al. 2018): a fixed-sparsity random ERK network whose smallest-magnitude
    connections are replaced by random ones; the drop fraction is cosine-decayed as in the
    RigL paper's SET baseline (``drop_fraction_min = drop_fraction`` keeps it constant)."""

    rule = RandomRegrowth


@METHODS.register("rigl", "rigged lottery: ERK mask, drop |w|, regrow by dense gradient (Evci et al. 2020)")
class RigL(_ConstantSparsitySwaps):
    """RigL (Evci et al. 2020): every ``every`` = 100 steps drop ``drop_fraction`` = 0.3
    (cosine-decayed) of each layer's smallest-magnitude weights and regrow as many where the
    dense gradient is largest; updates stop at ``end`` = 75% of training. Regrown weights
    and their momentum start at zero."""

    rule = GradientRegrowth


@METHODS.register("granet", "gradual global magnitude pruning + zero-cost neuroregeneration (Liu et al. 2021)")
class GraNet(_DuringTraining):
    """GraNet (Liu et al. 2021). Every ``every`` steps between ``start`` and ``end``: global
    magnitude pruning to the cubic schedule (Eq. 1) from ``initial_sparsity`` to ``sparsity``;
    and every ``every`` steps until the end of training: per layer, drop ``r`` of the active
    weights by magnitude and regrow as many by dense-gradient magnitude (Eq. 2-3), with ``r``
    cosine-decayed from ``drop_fraction`` = 0.5 to ``drop_fraction_min`` = 0.005 (the paper's
    code; ``regrowth`` names another rule). ``initial_sparsity`` = 0 is dense-to-sparse; 0.5 starts from a random ERK mask
    (sparse-to-sparse). Regrown weights start at zero: pruned weights keep no history."""

    def __init__(self, model, optimizer=None, *, sparsity: float, total_steps: int, steps_per_epoch: int | None = None,
                 initial_sparsity: float = 0.0, initial_scope: str = "erk", start="0it", end="50%", every=100,
                 drop_fraction: float = 0.5, drop_fraction_min: float = 0.005, scope: str = "global",
                 regrowth: str | None = None, **kwargs):
        self._length(total_steps, steps_per_epoch)
        if initial_sparsity >= sparsity:
            raise ConfigError(f"GraNet initial_sparsity {initial_sparsity} must be below the final sparsity {sparsity}")
        start_step, every_step = self._steps(start, "start"), self._steps(every, "every")
        schedule = Cubic(final=sparsity, initial=initial_sparsity, start=start_step,
                         end=self._steps(end, "end"), every=every_step)
        swaps = CosineDropFraction(initial=drop_fraction, every=every_step, start=start_step,
                                   end=total_steps, minimum=drop_fraction_min)
        super().__init__(
            model, optimizer, score=magnitude, sparsity=sparsity, scope=scope, schedule=schedule,
            initial_sparsity=initial_sparsity, initial_scope=initial_scope,
            regrowth=self._rule(regrowth, GradientRegrowth),
            swap_schedule=swaps, **kwargs,
        )


@METHODS.register("ctre", "cosine-similarity regrowth + random exploration, no dense gradient (Atashgahi et al. 2022)")
class CTRE(_DuringTraining):
    """CTRE (Atashgahi et al. 2022): SET's loop with a Hebbian regrowth rule: grow the
    connections between units whose activations have the largest |cosine similarity| on a
    batch, and an ``explore`` share at random (topology exploration). Drops ``zeta`` = 0.2
    of each layer's smallest weights every epoch (``every="1ep"``) until the end. Needs
    ``batches`` (an iterable of ``(x, y)`` batches, e.g. an unshuffled ``DataLoader``; one
    batch per update) but no dense gradient."""

    def __init__(self, model, optimizer=None, *, sparsity: float, total_steps: int, steps_per_epoch: int | None = None,
                 drop_fraction: float = 0.2, drop_fraction_min: float | None = None, every="1ep", end="100%",
                 explore: float = 0.2, scope: str = "erk", **kwargs):
        self._length(total_steps, steps_per_epoch)
        minimum = drop_fraction if drop_fraction_min is None else drop_fraction_min
        super().__init__(
            model, optimizer, score=magnitude, sparsity=sparsity, scope=scope, schedule=Constant(sparsity),
            initial_sparsity=sparsity, initial_scope=scope, regrowth=CosineRegrowth(explore=explore),
            swap_schedule=_swap_schedule(self, drop_fraction, every, end, minimum=minimum), **kwargs,
        )
