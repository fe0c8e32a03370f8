"""Lottery tickets: iterative magnitude pruning (IMP) with rewinding, as one sparsifier.

IMP (Frankle & Carbin 2019) repeats *train -> prune p% of the remaining weights -> reset ->
train*. Training is the user's loop (or :mod:`secateurs.experiments.lottery`); this object
only adds :meth:`LotteryTicket.step` after ``optimizer.step()`` (masks stay applied, and the
rewind point is saved when round 0 reaches it) and :meth:`LotteryTicket.next_round` between
rounds. Its parts are the shared ones: a mask criterion (:mod:`secateurs.criteria`, default
``large_final`` = magnitude), per-layer rates or a global budget (:mod:`secateurs.allocation`),
the engine's :func:`~secateurs.engine.prune` and a reset (:mod:`secateurs.resets`).

Resets between rounds (``reset=``):

- ``"rewind"``: every parameter and buffer back to the rewind point -- the initialisation
  (``rewind_step=0``, Frankle & Carbin 2019) or iteration k of round 0 (Frankle et al. 2020)
  -- then the kept weights initialised by ``init`` (``"original"`` keeps the rewound values;
  the alternatives of Zhou et al. 2019 are in :data:`secateurs.resets.KEPT_INITS`);
- ``"keep"``: the trained weights stay: fine-tuning, learning-rate rewinding (Renda et al.
  2020) and retraining schedules differ only in the learning rate the loop uses next.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from ..allocation import allocate, check_sparsity, global_keep, keep_count, rate_keep
from ..allocation import layer_rates as resolve_layer_rates
from ..criteria import CRITERIA, make_score
from ..engine import prune
from ..errors import CheckpointError, ConfigError
from ..masks import unwrap_model
from ..resets import KEPT_INITS, init_kept_, rewind_, snapshot
from ..scores import magnitude
from ..validate import check_int
from ..vocabulary import IMP_RESETS, IMP_SCOPES
from .base import Sparsifier

RESETS = IMP_RESETS  # the subset of :data:`secateurs.vocabulary.RESETS` a ticket takes
SCOPES = IMP_SCOPES  # the subset of :data:`secateurs.vocabulary.SCOPES` IMP takes


class LotteryTicket(Sparsifier):
    """Iterative pruning by a mask criterion, with rewinding between rounds.

    Args:
        model / optimizer: any module and optimizer (state of pruned weights is zeroed).
        rate: fraction of the *remaining* prunable weights removed per round (0.2 = 20%).
        output_rate: rate of the last prunable layer (LTH: half the rate); None = ``rate``.
        layer_rates: ``{glob: rate}`` overrides (e.g. conv layers at 10%).
        scope: ``"uniform"`` (each layer loses its own rate; ``"layerwise"`` is its old
            spelling) or ``"global"`` (``rate`` of
            all remaining weights, one score threshold across layers).
        criterion: a name from :data:`secateurs.criteria.CRITERIA`, scored from the weights at
            the rewind point and the current (trained) weights.
        rewind_step: optimizer steps into round 0 at which the rewind point is saved (0: now,
            the initialisation).
        reset: ``"rewind"`` or ``"keep"`` (see the module docstring).
        init: how kept weights are initialised after a rewind (:data:`KEPT_INITS`).
        reset_optimizer: clear the optimizer's state (momentum, Adam moments) at each new
            round, so every round starts like a fresh training run (as open_lth does).
        include / exclude / seed / takeover: as for :class:`~secateurs.methods.Sparsifier`.
    """

    timing = "after"
    warn_dense_step = False  # round 0 trains dense by design
    _plan_fields = ("rates", "imp_scope", "criterion", "rewind_step", "reset", "init")

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        rate: float = 0.2,
        output_rate: float | None = None,
        layer_rates: Mapping[str, float] | None = None,
        scope: str = "uniform",
        criterion: str = "large_final",
        rewind_step: int = 0,
        reset: str = "rewind",
        init: str = "original",
        reset_optimizer: bool = True,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        seed: int = 0,
        takeover: bool = False,
    ):
        scope = IMP_SCOPES.check(scope, "IMP scope")
        reset = IMP_RESETS.check(reset, "IMP reset")
        CRITERIA.get(criterion)
        KEPT_INITS.get(init)
        check_int(rewind_step, "rewind_step", minimum=0, hint="it counts optimizer steps")
        if scope == "global" and (output_rate is not None or layer_rates):
            raise ConfigError(
                "scope='global' prunes `rate` of all remaining weights under one threshold, so output_rate and "
                "layer_rates do not apply; use scope='uniform' for per-layer rates, or exclude layers instead"
            )
        # prune() (one-shot, outside the rounds) ranks by magnitude = large_final
        super().__init__(model, optimizer, score=magnitude, include=include, exclude=exclude, seed=seed,
                         takeover=takeover)
        self.rate = rate
        self.rates = resolve_layer_rates(self.masks.names(), rate, output_rate, layer_rates)
        self.imp_scope = scope
        self.criterion = criterion
        self.rewind_step = rewind_step
        self.reset = reset
        self.init = init
        self.reset_optimizer = reset_optimizer
        self.round = 0
        self.round_steps = 0
        self.rewind_point: dict[str, torch.Tensor] | None = None
        if rewind_step == 0:
            self.rewind_point = snapshot(model)

    # -- the two calls in the user's loop ---------------------------------------------------
    def step(self) -> None:
        """After every ``optimizer.step()``: keep pruned weights at zero; in round 0, save the
        rewind point once ``rewind_step`` steps are done."""
        super().step()
        self.round_steps += 1
        if self.round == 0 and self.rewind_point is None and self.round_steps == self.rewind_step:
            self.rewind_point = snapshot(self.model)

    @torch.no_grad()
    def next_round(self) -> dict:
        """Prune one round by the criterion, reset the weights per ``reset`` / ``init`` and
        return the mask stats. Call it after a round's training."""
        self._refuse_if_closed("next_round()")
        initial = self._rewind_weights()
        score = make_score(self.criterion, initial)
        scores = score(self.masks.weights(), self.generator)
        active = self.masks.active()
        if self.imp_scope == "uniform":
            keep = rate_keep(active, self.rates)
        else:
            remaining = sum(active.values())
            keep = global_keep(scores, self.masks.masks, remaining - round(self.rate * remaining))
        self.masks.update_(prune(self.masks.masks, scores, keep), keep)
        self.masks.sync_()
        if self.reset == "rewind":
            rewind_(self.model, self.rewind_point)
            init_kept_(self.init, self.model, self.masks.masks, initial, self.generator)
        if self.reset_optimizer and self.optimizer is not None:
            self.optimizer.state.clear()
        self.masks.enforce_(self.optimizer)
        self.round += 1
        self.round_steps = self.rewind_step if self.reset == "rewind" else 0
        self._record("round", self.masks.sparsity(), round=self.round)
        return self.masks.stats()

    def _rewind_weights(self) -> dict[str, torch.Tensor]:
        if self.rewind_point is None:
            raise ConfigError(
                f"the rewind point (step {self.rewind_step} of round 0) was never saved: round 0 took only "
                f"{self.round_steps} steps; train at least rewind_step steps, or lower rewind_step"
            )
        names = self.masks.names()
        missing = [n for n in names if n not in self.rewind_point]
        if missing:
            raise CheckpointError(f"the saved rewind point lacks {', '.join(missing[:4])}; it is from another model")
        return {n: self.rewind_point[n] for n in names}

    # -- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "round": self.round,
            "round_steps": self.round_steps,
            "rewind_point": None if self.rewind_point is None else {k: v.clone() for k, v in self.rewind_point.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        if "round" not in state or "rewind_point" not in state:
            raise CheckpointError(
                "not a LotteryTicket state (no round / rewind point); it was saved by another sparsifier"
            )
        point = state["rewind_point"]
        if point is None and (state["round"] > 0 or self.rewind_step == 0):
            raise CheckpointError(
                "the state has no saved rewind point (the initialisation), so the ticket cannot be rewound; "
                "resume from a checkpoint written after the rewind point was saved"
            )
        if point is not None:
            live = {**dict(unwrap_model(self.model).named_buffers()), **dict(unwrap_model(self.model).named_parameters())}
            bad = [k for k in live if k not in point or point[k].shape != live[k].shape]
            if bad:
                raise CheckpointError(
                    f"the saved rewind point does not fit this model ({', '.join(bad[:4])} missing or reshaped); "
                    "it was saved from another model"
                )
        super().load_state_dict(state)
        self.round = int(state["round"])
        self.round_steps = int(state["round_steps"])
        self.rewind_point = None if point is None else {k: v.clone() for k, v in point.items()}


def criterion_masks(
    initial: Mapping[str, torch.Tensor],
    final: Mapping[str, torch.Tensor],
    criterion: str,
    sparsity: float,
    *,
    scope: str = "uniform",
    generator: torch.Generator | None = None,
    output_sparsity: float | None = None,
) -> dict[str, torch.Tensor]:
    """One-shot masks at ``sparsity`` from a criterion of (initial, final) weights (Zhou et
    al. 2019): e.g. ``large_final_same_sign`` masks applied to the *untrained* initial
    weights are "supermasks". ``scope`` is an allocation scope (``uniform`` = the same
    sparsity per layer, as in their per-layer prune percentages; ``global``; ``erk``).

    ``output_sparsity`` pins the last layer (in ``final``'s order) at that sparsity, and the
    other layers share the rest so that all layers together still reach ``sparsity`` (with
    ``uniform``, at one common sparsity; see :func:`half_rate_output_sparsity`)."""
    check_sparsity(sparsity)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    scores = make_score(criterion, initial)(final, generator)
    dense = {n: torch.ones_like(w, dtype=torch.bool) for n, w in final.items()}
    if output_sparsity is None:
        keep = allocate(scope, scores, dense, sparsity)
        return prune(dense, scores, keep)
    check_sparsity(output_sparsity, "output-layer sparsity")
    names = list(final)
    output = names[-1]
    fixed = {output: output_sparsity}
    if scope != "uniform":  # global / erk: allocate keeps the total exact around pinned layers
        return prune(dense, scores, allocate(scope, scores, dense, sparsity, fixed_sparsity=fixed))
    numel = {n: final[n].numel() for n in names}
    free = sum(numel[n] for n in names[:-1])
    budget = keep_count(sum(numel.values()), sparsity) - keep_count(numel[output], output_sparsity)
    if not names[:-1] or budget < 0 or budget > free:
        raise ConfigError(
            f"output-layer sparsity {output_sparsity} cannot be combined with a total sparsity of {sparsity}: "
            f"the output layer alone keeps {keep_count(numel[output], output_sparsity)} weights and the total "
            f"allows {keep_count(sum(numel.values()), sparsity)} out of {free} in the other layers"
        )
    keep = allocate("uniform", scores, dense, 1.0 - budget / free if free else 0.0, fixed_sparsity=fixed)
    return prune(dense, scores, keep)


def half_rate_output_sparsity(numel: Sequence[int], sparsity: float, rate: float = 0.2, output_rate: float = 0.1) -> float:
    """Output-layer sparsity for a total of ``sparsity`` when the output layer is pruned at
    ``output_rate`` per step and the others at ``rate`` (Zhou et al. 2019's code for FC
    300-100-10 keeps ``0.8 ** p`` of each hidden layer and ``0.9 ** p`` of the output layer,
    ``--prune_base 0.8,0.9``, the same power ``p`` for both). ``numel`` lists the layers' sizes,
    the output layer last. Solves for ``p`` by bisection and returns ``1 - (1 - output_rate) ** p``."""
    check_sparsity(sparsity)
    *hidden, out = [int(n) for n in numel]
    total, target = sum(hidden) + out, (1.0 - sparsity) * (sum(hidden) + out)

    def kept(p: float) -> float:
        return (1 - rate) ** p * sum(hidden) + (1 - output_rate) ** p * out

    lo, hi = 0.0, 1.0
    while kept(hi) > target:
        hi *= 2
        if hi > 1e4:
            raise ConfigError(f"no pruning power reaches sparsity {sparsity} over {total} weights")
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kept(mid) > target else (lo, mid)
    return 1.0 - (1 - output_rate) ** ((lo + hi) / 2)
