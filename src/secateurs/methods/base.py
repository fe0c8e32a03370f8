"""The sparsifier: the one stateful object of the library.

It owns the sparsity state (:class:`~secateurs.masks.Masks`), and at the steps its schedule
names it runs score -> allocation -> engine. A user adds one call, ``sparsifier.step()``,
right after ``optimizer.step()``.
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ..allocation import SCOPES, allocate, check_sparsity
from ..engine import prune
from ..errors import CheckpointError, ConfigError, UnknownNameError
from ..masks import DEFAULT_PRUNABLE_TYPES, Masks
from ..schedules import Schedule

_STATE_FORMAT = "secateurs.sparsifier/1"

ScoreFn = Callable[[Mapping[str, torch.Tensor], torch.Generator], dict]


class Sparsifier:
    """Prunes ``model`` by ``score`` with a layer ``scope``, now (:meth:`prune`) or on a
    ``schedule`` (:meth:`step`), and keeps pruned weights and their optimizer state at zero.

    Args:
        model: any ``nn.Module`` (DDP / compiled wrappers are unwrapped).
        optimizer: any ``torch.optim`` optimizer, or None; its per-weight state is masked.
        score: ``score(weights, generator) -> {name: tensor}``; higher = keep.
        sparsity: target used by :meth:`prune` when called without an argument.
        scope: ``"global"``, ``"uniform"``, ``"erk"`` or ``"er"`` (see :mod:`secateurs.allocation`).
        schedule: when and how far to prune during training; None = only on :meth:`prune`.
        include / exclude / types: which parameters are prunable (see :func:`select_prunable`).
        keep_dense: glob patterns of prunable parameters that stay dense.
        layer_sparsity: ``{glob pattern: sparsity}`` overrides for some layers.
        allow_layer_collapse: permit a layer to lose every weight (an error otherwise).
        seed: seeds the generator handed to random scores.
    """

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
    ):
        if sparsity is not None:
            check_sparsity(sparsity)
        self.masks = Masks(model, include, exclude, types)
        self.optimizer = optimizer
        self.score = score
        self.target = sparsity
        self.scope = scope
        self.schedule = schedule
        self.allow_layer_collapse = allow_layer_collapse
        self.fixed_sparsity = self._resolve_fixed(keep_dense, layer_sparsity or {})
        if scope not in SCOPES:
            raise UnknownNameError(f"unknown scope {scope!r}; known scopes: {', '.join(SCOPES)}")
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        self.history: list[dict] = []

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
        weights = self.masks.weights()
        scores = self.score(weights, self.generator)
        keep = allocate(
            self.scope,
            scores,
            self.masks.masks,
            target,
            fixed_sparsity=self.fixed_sparsity,
            allow_layer_collapse=self.allow_layer_collapse,
        )
        new = prune(self.masks.masks, scores, keep)
        self.masks.update_(new, keep)  # raises if the achieved counts differ from the plan
        self.masks.enforce_(self.optimizer)
        record = {"step": self.steps, "target": target, "sparsity": self.masks.sparsity()}
        self.history.append(record)
        return self.masks.stats()

    def step(self) -> None:
        """Call after every ``optimizer.step()``: re-zero pruned weights / state, and prune
        when the schedule says so."""
        self.steps += 1
        if self.schedule is not None and self.schedule.updates_at(self.steps):
            self.prune(self.schedule.sparsity_at(self.steps))
        else:
            self.masks.enforce_(self.optimizer)

    def mask_grads_(self) -> None:
        """Zero pruned weights' gradients now (before clipping, so the norm is the sparse
        network's)."""
        self.masks.mask_grads_()

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
        }

    def load_state_dict(self, state: Mapping) -> None:
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            raise CheckpointError("not a secateurs sparsifier state (missing or unknown 'format' tag)")
        self.masks.load_state_dict(state["masks"])
        self.steps = int(state["steps"])
        self.generator.set_state(state["generator"])
        self.history = list(state["history"])
        self.masks.apply_()
