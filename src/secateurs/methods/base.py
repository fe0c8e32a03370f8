"""The sparsifier: the one stateful object of the library.

It owns the sparsity state (:class:`~secateurs.masks.Masks`), and at the steps its schedules
name it runs score -> allocation -> engine: a prune (:func:`~secateurs.engine.prune`) when the
sparsity schedule says so, a swap (:func:`~secateurs.engine.drop_and_grow`) when the regrowth
schedule says so. A user adds one call, ``sparsifier.step()``, right after ``optimizer.step()``.
"""
from __future__ import annotations

import fnmatch
from typing import Callable, ClassVar, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..allocation import SCOPES, allocate, check_sparsity, keep_count
from ..engine import drop_and_grow, prune
from ..errors import CheckpointError, ConfigError, SparsityMismatchError, UnknownNameError
from ..masks import DEFAULT_PRUNABLE_TYPES, Masks
from ..regrowth import GrowContext, RegrowthRule, regrow_by_gradient
from ..schedules import CosineDropFraction, Schedule
from ..scores import random as random_score

_STATE_FORMAT = "secateurs.sparsifier/1"
Batches = Callable[[], Iterable]

ScoreFn = Callable[[Mapping[str, torch.Tensor], torch.Generator], dict]


class Sparsifier:
    """Prunes ``model`` by ``score`` with a layer ``scope``, now (:meth:`prune`) or on a
    ``schedule`` (:meth:`step`), optionally swaps connections by a ``regrowth`` rule, and keeps
    pruned weights and their optimizer state at zero.

    Args:
        model: any ``nn.Module`` (DDP / compiled wrappers are unwrapped).
        optimizer: any ``torch.optim`` optimizer, or None; its per-weight state is masked.
        score: ``score(weights, generator) -> {name: tensor}``; higher = keep. Also the drop
            score of a swap.
        sparsity: target used by :meth:`prune` when called without an argument.
        scope: ``"global"``, ``"uniform"``, ``"erk"`` or ``"er"`` (see :mod:`secateurs.allocation`).
        schedule: when and how far to prune during training; None = only on :meth:`prune`.
        include / exclude / types: which parameters are prunable (see :func:`select_prunable`).
        keep_dense: glob patterns of prunable parameters that stay dense.
        layer_sparsity: ``{glob pattern: sparsity}`` overrides for some layers.
        allow_layer_collapse: permit a layer to lose every weight (an error otherwise).
        seed: seeds the generator handed to random scores (same seed on every DDP rank).
        initial_sparsity / initial_scope: start from a random mask at this sparsity with this
            allocation (sparse-from-scratch training: SET, RigL, GraNet s_i > 0).
        regrowth / swap_schedule: a :class:`~secateurs.regrowth.RegrowthRule` and when / how
            much to swap (dynamic sparse training).
        batches: zero-argument callable returning an iterable of ``(x, y)`` batches, for rules
            and scores that need data; it must yield the same sequence on every call (e.g. an
            unshuffled loader) so that a resumed run draws the same batches.
    """

    #: when the method prunes relative to training: "after" (prune a trained network, then
    #: fine-tune), "init" (prune before training) or "during" (its schedule runs in training)
    timing: ClassVar[str] = "after"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        score: ScoreFn,
        sparsity: float | None = None,
        scope: str = "global",
        schedule: Schedule | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        types: Sequence[type[nn.Module]] = DEFAULT_PRUNABLE_TYPES,
        keep_dense: Sequence[str] = (),
        layer_sparsity: Mapping[str, float] | None = None,
        allow_layer_collapse: bool = False,
        seed: int = 0,
        initial_sparsity: float = 0.0,
        initial_scope: str = "erk",
        regrowth: RegrowthRule | None = None,
        swap_schedule: CosineDropFraction | None = None,
        batches: Batches | None = None,
    ):
        if sparsity is not None:
            check_sparsity(sparsity)
        check_sparsity(initial_sparsity, "initial_sparsity")
        for what, value in (("scope", scope), ("initial_scope", initial_scope)):
            if value not in SCOPES:
                raise UnknownNameError(f"unknown {what} {value!r}; known scopes: {', '.join(SCOPES)}")
        if (regrowth is None) != (swap_schedule is None):
            raise ConfigError("regrowth and swap_schedule go together: give both (dynamic sparse training) or neither")
        self.model = model
        self.masks = Masks(model, include, exclude, types)
        self.optimizer = optimizer
        self.score = score
        self.target = sparsity
        self.scope = scope
        self.schedule = schedule
        self.regrowth = regrowth
        self.swap_schedule = swap_schedule
        self.batches = batches
        self.allow_layer_collapse = allow_layer_collapse
        self.fixed_sparsity = self._resolve_fixed(keep_dense, layer_sparsity or {})
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        self.history: list[dict] = []
        self._batch_iter: Iterator | None = None
        self._batches_used = 0
        if initial_sparsity > 0:
            self._prune(initial_sparsity, random_score, initial_scope, kind="init")

    def _resolve_fixed(self, keep_dense: Sequence[str], overrides: Mapping[str, float]) -> dict[str, float]:
        names = self.masks.names()
        fixed: dict[str, float] = {}
        for pattern, value in [(p, 0.0) for p in keep_dense] + list(overrides.items()):
            hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise ConfigError(
                    f"layer pattern {pattern!r} matches no prunable parameter; "
                    f"prunable names are: {', '.join(names[:6])}"
                )
            for n in hits:
                fixed[n] = check_sparsity(value, f"sparsity for {pattern!r}")
        return fixed

    # -- the two user calls --------------------------------------------------------------
    @torch.no_grad()
    def prune(self, sparsity: float | None = None) -> dict:
        """Prune now to ``sparsity`` (default: the constructor's) and return the mask stats."""
        target = self.target if sparsity is None else sparsity
        if target is None:
            raise ConfigError("no sparsity given: pass prune(sparsity=...) or Sparsifier(sparsity=...)")
        check_sparsity(target)
        self._prune(target, self.score, self.scope)
        return self.masks.stats()

    def step(self) -> None:
        """Call after every ``optimizer.step()``: re-zero pruned weights / state, and prune or
        swap connections when the schedules say so."""
        self.steps += 1
        t = self.steps
        prune_now = self.schedule is not None and self.schedule.updates_at(t)
        swap_now = self.swap_schedule is not None and self.swap_schedule.updates_at(t)
        if not (prune_now or swap_now):
            self.masks.enforce_(self.optimizer)
            return
        with torch.no_grad():
            gradients = None
            if swap_now and self.regrowth.needs_gradient:
                # the dense gradient of this step's backward, read before masking zeroes it
                gradients = regrow_by_gradient(self.masks.weights())
            self.masks.enforce_(self.optimizer)
            if prune_now:
                target = self.schedule.sparsity_at(t)
                total = sum(self.masks.numel().values())
                if keep_count(total, target) < sum(self.masks.active().values()):
                    self._prune(target, self.score, self.scope)
            if swap_now:
                self._swap(self.swap_schedule.fraction_at(t), gradients)

    def mask_grads_(self) -> None:
        """Zero pruned weights' gradients now (before clipping, so the norm is the sparse
        network's). Skipped just before a gradient-regrowth swap, which needs them dense."""
        upcoming = self.steps + 1
        if (
            self.swap_schedule is not None
            and self.regrowth.needs_gradient
            and self.swap_schedule.updates_at(upcoming)
        ):
            return
        self.masks.mask_grads_()

    # -- the updates ---------------------------------------------------------------------
    def _prune(self, target: float, score: ScoreFn, scope: str, kind: str = "prune") -> None:
        weights = self.masks.weights()
        scores = score(weights, self.generator)
        keep = allocate(
            scope,
            scores,
            self.masks.masks,
            target,
            fixed_sparsity=self.fixed_sparsity,
            allow_layer_collapse=self.allow_layer_collapse,
        )
        total = sum(self.masks.numel().values())
        if scope != "uniform" and not self.fixed_sparsity and sum(keep.values()) != keep_count(total, target):
            raise SparsityMismatchError(
                f"{scope} allocation planned {sum(keep.values())} weights but sparsity {target} of {total} "
                f"keeps {keep_count(total, target)} (this is a bug; please report it)"
            )
        new = prune(self.masks.masks, scores, keep)
        self.masks.update_(new, keep)  # raises if the achieved counts differ from the plan
        self.masks.sync_()
        self.masks.enforce_(self.optimizer)
        self._record(kind, target)

    def _swap(self, fraction: float, gradients: Mapping[str, torch.Tensor] | None) -> None:
        """Drop ``fraction`` of each layer's active weights by the drop score and regrow as
        many by the regrowth rule; grown weights start at zero with zero optimizer state
        (they were inactive, hence zeroed, until now)."""
        active, numel = self.masks.active(), self.masks.numel()
        counts = {n: min(round(fraction * active[n]), numel[n] - active[n]) for n in active}
        weights = self.masks.weights()
        ctx = GrowContext(
            model=self.model, weights=weights, masks=self.masks.masks, counts=counts,
            generator=self.generator, batch=self._next_batch() if self.regrowth.needs_batch else None,
            gradients=gradients,
        )
        grow = self.regrowth.scores(ctx)
        drop = self.score(weights, self.generator)
        new, _ = drop_and_grow(self.masks.masks, drop, grow, counts)
        self.masks.update_(new, active)  # the count of every layer is conserved
        self.masks.sync_()
        self.masks.enforce_(self.optimizer)
        self._record("swap", self.masks.sparsity(), swapped=sum(counts.values()), fraction=fraction,
                     dense_gradient=self.regrowth.needs_gradient)

    def _record(self, kind: str, target: float, **extra) -> None:
        stats = self.masks.stats()
        self.history.append({
            "step": self.steps, "kind": kind, "target": target, "sparsity": stats["sparsity"],
            "density": {n: 1.0 - v["sparsity"] for n, v in stats["layers"].items()},
            "dense_gradient": False, **extra,
        })

    def _next_batch(self) -> tuple:
        if self.batches is None:
            raise ConfigError(
                f"{type(self).__name__} needs data: pass batches=<callable returning an iterable of (x, y)>"
            )
        for _ in range(2):
            if self._batch_iter is None:
                self._batch_iter = iter(self.batches())
            try:
                batch = next(self._batch_iter)
                self._batches_used += 1
                return batch
            except StopIteration:
                self._batch_iter = None
        raise ConfigError("the batches callable returned an empty iterable; it must yield (x, y) batches")

    # -- reporting -------------------------------------------------------------------------
    @property
    def sparsity(self) -> float:
        return self.masks.sparsity()

    def stats(self) -> dict:
        return self.masks.stats()

    # -- persistence -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": _STATE_FORMAT,
            "masks": self.masks.state_dict(),
            "steps": self.steps,
            "generator": self.generator.get_state(),
            "history": list(self.history),
            "batches_used": self._batches_used,
        }

    def load_state_dict(self, state: Mapping) -> None:
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            raise CheckpointError("not a secateurs sparsifier state (missing or unknown 'format' tag)")
        self.masks.load_state_dict(state["masks"])
        self.steps = int(state["steps"])
        self.generator.set_state(state["generator"])
        self.history = list(state["history"])
        self._fast_forward(int(state.get("batches_used", 0)))
        self.masks.apply_()

    def _fast_forward(self, used: int) -> None:
        """Draw the batches an interrupted run had drawn, so the next one is the same."""
        self._batch_iter, self._batches_used = None, 0
        for _ in range(used):
            self._next_batch()

