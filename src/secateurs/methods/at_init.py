"""Pruning at initialisation: prune once, before training, then train the sparse network.

| method | score | data | rounds | default scope |
|---|---|---|---|---|
| SNIP        | ``|g ⊙ w|`` (Lee et al. 2019)              | ``num_batches`` batches | 1 | global |
| GraSP       | ``θ ⊙ Hg`` keep score (Wang et al. 2020)   | ``num_batches`` batches | 1 | global |
| SynFlow     | ``|θ ⊙ dR/dθ|`` (Tanaka et al. 2020)       | none (all-ones input)   | ``rounds`` = 100, exponential | global |
| random_init | uniform noise (Liu et al. 2022)            | none                    | 1 | erk |

Every method here takes ``sanity_check``, the ablations of Frankle et al. (2021, "Pruning
neural networks at initialization: why are we missing the mark?"): ``"layer_shuffle"`` moves
each layer's kept connections to random positions (same per-layer densities) and
``"reinit"`` re-draws the kept weights from their initialisation (``reinit_from``), mask
unchanged. If accuracy survives them, the method chose layer densities, not connections.

The experiment runner calls ``prune(sparsity)`` once before training; data methods draw
their batches from ``batches`` (an unshuffled loader) through ``_next_batch``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..allocation import allocate, check_sparsity, global_keep, keep_count
from ..engine import prune as engine_prune
from ..errors import ConfigError, UnknownNameError
from ..outputs import first_tensor, split_batch
from ..resets import INITS, reinitialize_, rewind_, shuffle_within_layers, snapshot
from ..scores import grasp, random, snip, synflow
from ..validate import check_int, check_number
from .base import Sparsifier
from .registry import METHODS

#: the sanity checks of Frankle et al. (2021) every at-init method accepts
SANITY_CHECKS = ("layer_shuffle", "reinit")


class _AtInit(Sparsifier):
    """Shared plumbing: one ``prune`` that scores, allocates, applies an optional sanity
    check, and leaves model and masks untouched if anything raises."""

    timing = "init"
    _plan_fields = ("sanity_check",)

    def __init__(self, model, optimizer=None, *, score, scope: str = "global", sanity_check: str | None = None,
                 reinit_from: str | Callable = "reset_parameters", **kwargs):
        if sanity_check is not None and sanity_check not in SANITY_CHECKS:
            raise UnknownNameError(
                f"unknown sanity_check {sanity_check!r}; known sanity checks: {', '.join(SANITY_CHECKS)} (or None)"
            )
        if not callable(reinit_from) and reinit_from not in INITS:
            raise UnknownNameError(f"unknown reinit_from {reinit_from!r}; known inits: {', '.join(INITS)}")
        self.sanity_check = sanity_check
        self.reinit_from = reinit_from
        super().__init__(model, optimizer, score=score, scope=scope, **kwargs)

    @torch.no_grad()
    def prune(self, sparsity: float | None = None) -> dict:
        """Prune the network at its current (initial) weights to ``sparsity`` and return the
        mask stats. On any error the weights, masks, generator and history are restored."""
        self._refuse_if_closed("prune()")
        target = self.target if sparsity is None else sparsity
        if target is None:
            raise ConfigError(f"no sparsity given: pass prune(sparsity=...) or {type(self).__name__}(sparsity=...)")
        check_sparsity(target)
        names = self.masks.names()
        weights, masks, n_history = snapshot(self.model, names), self.masks.state_dict(), len(self.history)
        rng = self.generator.get_state()
        try:
            self._prune_at_init(target)
            if self.sanity_check is not None:
                self._apply_sanity_check(weights)
        except BaseException:
            self.masks.load_state_dict(masks)
            rewind_(self.model, weights, names)
            self.generator.set_state(rng)
            del self.history[n_history:]
            raise
        return self.masks.stats()

    def _prune_at_init(self, target: float) -> None:
        self._prune(target, self.score, self.scope)

    def _apply_sanity_check(self, initial: dict[str, torch.Tensor]) -> None:
        names = self.masks.names()
        if self.sanity_check == "layer_shuffle":
            active = self.masks.active()
            shuffled = shuffle_within_layers(self.masks.masks, self.generator)
            # the prune zeroed the dropped weights: bring back the initial values before the
            # kept set moves onto them
            rewind_(self.model, initial, names)
            self.masks.update_(shuffled, active)
        else:
            reinitialize_(self.model, names, self.generator, init=self.reinit_from)
        self.masks.sync_()
        self.masks.enforce_(self.optimizer)
        self.history[-1]["sanity_check"] = self.sanity_check


def _check_count(value, what: str) -> int:
    return check_int(value, what, minimum=1)


@METHODS.register("snip", "prune at init by connection sensitivity |g*w| on a batch (Lee et al. 2019)")
class SNIP(_AtInit):
    """SNIP (Lee et al. 2019): keep the connections with the largest ``|g ⊙ w|`` on
    ``num_batches`` batches (the paper: one batch), one shot, one global threshold.
    ``batches``: an iterable of ``(x, y)`` batches, e.g. ``SNIP(model, batches=loader)``."""

    _plan_fields = ("num_batches",)

    def __init__(self, model, optimizer=None, *, num_batches: int = 1,
                 loss_fn: Callable | None = None, scope: str = "global", **kwargs):
        self.num_batches = _check_count(num_batches, "snip num_batches")
        self.loss_fn = loss_fn
        super().__init__(model, optimizer, score=self._score, scope=scope, **kwargs)

    def _score(self, weights, generator):
        batches = [self._next_batch() for _ in range(self.num_batches)]
        return snip(self.model, weights, batches, self.loss_fn)


@METHODS.register("grasp", "prune at init preserving gradient flow, Hessian-gradient product (Wang et al. 2020)")
class GraSP(_AtInit):
    """GraSP (Wang et al. 2020): remove the weights whose removal reduces the gradient norm
    least, i.e. keep the highest ``θ ⊙ Hg`` (see :func:`secateurs.scores.grasp` for the sign),
    on ``num_batches`` batches, with the reference code's logit ``temperature`` = 200.
    ``batches``: an iterable of ``(x, y)`` batches, e.g. ``GraSP(model, batches=loader)``."""

    _plan_fields = ("num_batches", "temperature")

    def __init__(self, model, optimizer=None, *, num_batches: int = 1, temperature: float = 200.0,
                 loss_fn: Callable | None = None, scope: str = "global", **kwargs):
        self.num_batches = _check_count(num_batches, "grasp num_batches")
        check_number(temperature, "grasp temperature", above=0)
        self.temperature = float(temperature)
        self.loss_fn = loss_fn
        super().__init__(model, optimizer, score=self._score, scope=scope, **kwargs)

    def _score(self, weights, generator):
        batches = [self._next_batch() for _ in range(self.num_batches)]
        return grasp(self.model, weights, batches, self.loss_fn, temperature=self.temperature)


@METHODS.register("synflow", "data-free iterative synaptic flow pruning at init, 100 rounds (Tanaka et al. 2020)")
class SynFlow(_AtInit):
    """SynFlow (Tanaka et al. 2020, Algorithm 1): ``rounds`` = 100 rounds of scoring the
    *masked* network by ``|θ ⊙ dR/dθ|`` and pruning to the exponential schedule, density
    ``(1 - s) ** (k / rounds)`` at round ``k`` -- the iteration is what avoids layer collapse.

    Data-free, but the all-ones input needs the model's input shape: pass ``input_shape``
    (without the batch dimension, e.g. ``(1, 28, 28)``, or ``(sequence_length,)`` for a token
    model, whose all-ones input is defined in embedding space: see
    :func:`secateurs.scores.synflow` and ``tokens``), or ``batches`` to read it from one
    batch (the only thing read from it).

    With ``scope="global"`` each round keeps the top scores under one threshold (the paper);
    ``"erk"`` / ``"er"`` / ``"uniform"`` fix each layer's final count by the allocation and
    move every layer along its own exponential schedule, ranking by score within the layer.
    Layers pinned by ``keep_dense`` / ``layer_sparsity`` follow their own schedules too.
    Scores are rescaled by a power of two (exact) to a maximum in [1, 2) before the float32
    ranking, so float64 path norms of deep networks do not overflow it.
    """

    _plan_fields = ("rounds",)

    def __init__(self, model, optimizer=None, *, rounds: int = 100, input_shape: Sequence[int] | None = None,
                 tokens: bool | None = None, scope: str = "global", **kwargs):
        self.rounds = _check_count(rounds, "synflow rounds")
        if input_shape is not None:
            shape = tuple(input_shape)
            if not shape:
                raise ConfigError(
                    f"synflow input_shape must list the input's sizes without the batch dimension, "
                    f"e.g. [1, 28, 28]; got {input_shape!r}"
                )
            for s in shape:
                check_int(s, "each synflow input_shape size", minimum=1,
                          hint=f"input_shape lists the input's sizes without the batch dimension, e.g. [1, 28, 28]; got {input_shape!r}")
            input_shape = shape
        self.input_shape = input_shape
        self.tokens = tokens
        super().__init__(model, optimizer, score=self._score, scope=scope, **kwargs)

    def _shape(self) -> tuple[int, ...]:
        if self.input_shape is None:
            if self.batches is None:
                raise ConfigError(
                    "SynFlow is data-free but needs the model's input shape for its all-ones input: pass "
                    "input_shape=(C, H, W) (without the batch dimension), or batches=<an iterable of "
                    "(x, y) batches, e.g. a DataLoader> to read the shape from one batch"
                )
            x, _ = split_batch(self._next_batch())
            self.input_shape = tuple(int(s) for s in first_tensor(x).shape[1:])
        return self.input_shape

    def _score(self, weights, generator):
        raw = synflow(self.model, weights, self._shape(), tokens=self.tokens)
        top = max((float(s.max()) for s in raw.values() if s.numel()), default=0.0)
        if top <= 0.0:
            return raw
        _, exponent = torch.frexp(torch.tensor(top, dtype=torch.float64))
        return {n: torch.ldexp(s, torch.tensor(1 - int(exponent), dtype=torch.float64)) for n, s in raw.items()}

    def _prune_at_init(self, target: float) -> None:
        n = self.rounds
        numel, start = self.masks.numel(), self.masks.active()
        total_final = keep_count(sum(numel.values()), target)
        if total_final > sum(start.values()):
            raise ConfigError(
                f"the network already keeps {sum(start.values())} weights, fewer than sparsity {target} "
                f"keeps ({total_final}); pruning never revives weights"
            )
        # validates the budget once; for the per-layer scopes it is also the final plan (it
        # depends on the shapes only)
        plan = allocate(
            self.scope, {k: m.float() for k, m in self.masks.masks.items()}, self.masks.masks, target,
            fixed_sparsity=self.fixed_sparsity,
            allow_layer_collapse=self.allow_layer_collapse or self.scope == "global",
        )
        for k in range(1, n):
            scores = self.score(self.masks.weights(), self.generator)
            keep = self._round_keep(k / n, start, plan, total_final, scores, target)
            new = engine_prune(self.masks.masks, scores, keep)
            self.masks.update_(new, keep)
            self.masks.sync_()
            self.masks.enforce_(self.optimizer)
        self._prune(target, self.score, self.scope)  # the last round: exactly a one-shot prune
        self.history[-1]["rounds"] = n

    def _round_keep(self, frac, start, plan, total_final, scores, target) -> dict[str, int]:
        """Weights each layer keeps after a fraction ``frac`` of the rounds."""
        active = self.masks.active()

        def along(first: int, last: int, cap: int) -> int:
            """Exponential from ``first`` to ``last`` kept weights, never above ``cap``."""
            if first == 0:
                return 0
            return min(cap, max(last, round(first * (last / first) ** frac)))

        if self.scope != "global":
            keep = {name: along(start[name], plan[name], active[name]) for name in active}
        else:
            fixed = {name: along(start[name], plan[name], active[name]) for name in self.fixed_sparsity}
            free = [name for name in active if name not in fixed]
            free_active = sum(active[name] for name in free)
            free_final = total_final - sum(plan[name] for name in fixed)
            budget = along(sum(start.values()), total_final, sum(active.values())) - sum(fixed.values())
            budget = min(free_active, max(free_final, budget))
            keep = {**fixed, **(global_keep({name: scores[name] for name in free}, self.masks.masks, budget) if free else {})}
        keep = {name: keep[name] for name in active}
        collapsed = [name for name, k in keep.items() if k == 0 and start[name] > 0]
        if collapsed and not self.allow_layer_collapse:
            raise ConfigError(
                f"sparsity {target} with scope {self.scope!r} removes every weight of {', '.join(collapsed[:4])} "
                f"by SynFlow round {round(frac * self.rounds)} of {self.rounds}, which disconnects the network; "
                "lower the sparsity, raise rounds, keep those layers dense, or pass allow_layer_collapse=True"
            )
        return keep


@METHODS.register("random_init", "random mask at init (seeded), ERK by default: the at-init control")
class RandomInit(_AtInit):
    """A random mask at initialisation (Liu et al. 2022, "The unreasonable effectiveness of
    random pruning"): the control an at-init criterion must beat. ``scope="erk"`` (default),
    ``"er"`` or ``"uniform"`` set the per-layer densities; ``"global"`` with random scores is
    uniform in expectation. Unlike ``random`` (timing "after") it prunes before training."""

    def __init__(self, model, optimizer=None, *, scope: str = "erk", **kwargs):
        super().__init__(model, optimizer, score=random, scope=scope, **kwargs)
