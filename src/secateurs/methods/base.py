"""The sparsifier: the one stateful object of the library.

It owns the sparsity state (:class:`~secateurs.masks.Masks`), and at the steps its schedules
name it runs score -> allocation -> engine: a prune (:func:`~secateurs.engine.prune`) when the
sparsity schedule says so, a swap (:func:`~secateurs.engine.drop_and_grow`) when the regrowth
schedule says so. A user adds one call, ``sparsifier.step()``, right after ``optimizer.step()``.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import gc
import warnings
import weakref
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..allocation import allocate, check_sparsity, keep_count
from ..engine import drop_and_grow, prune
from ..errors import (
    CheckpointError, ConfigError, SecateursError, SparsityMismatchError, UsageWarning,
)
from ..masks import DEFAULT_PRUNABLE_TYPES, Masks
from ..outputs import batch_source
from ..regrowth import GrowContext, RegrowthRule, regrow_by_gradient
from ..schedules import CosineDropFraction, Schedule
from ..scores import random as random_score
from ..vocabulary import SCOPES

_STATE_FORMAT = "secateurs.sparsifier/1"
#: an iterable of ``(x, y)`` batches that can be iterated again (or a callable returning one)
Batches = Iterable | Callable[[], Iterable]

ScoreFn = Callable[[Mapping[str, torch.Tensor], torch.Generator], dict]

#: which live sparsifier manages each parameter: ``id(param) -> (ref(param), ref(sparsifier))``.
#: Weak both ways, so a garbage-collected sparsifier or model blocks nothing; not an attribute
#: on the parameter, so pickling / deep-copying a model carries no trace of it.
_OWNERS: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _owner_of(p: torch.Tensor) -> "Sparsifier | None":
    entry = _OWNERS.get(id(p))
    if entry is None:
        return None
    owner = entry[1]()
    if entry[0]() is not p or owner is None or owner._closed:
        return None
    return owner


def _spec(value: Any) -> Any:
    """A comparable, printable description of a plan entry (a schedule, a rule, a score)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):  # lists: a plan survives a JSON round trip unchanged
        return [_spec(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _spec(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return repr(value)
    if callable(value):
        return getattr(value, "__qualname__", type(value).__qualname__)
    return type(value).__qualname__


def _render(plan: Mapping[str, Any]) -> str:
    fields = ", ".join(f"{k}={v!r}" for k, v in plan.items() if k != "method" and v not in (None, {}, (), []))
    return f"{plan.get('method', '?')}({fields})"


class _Managed(type):
    """Metaclass of :class:`Sparsifier`: a sparsifier claims its parameters once its whole
    constructor (subclass included) has succeeded, so a constructor that raises claims nothing."""

    def __call__(cls, *args, **kwargs):
        obj = super().__call__(*args, **kwargs)
        obj._claim()
        return obj


class Sparsifier(metaclass=_Managed):
    """Prunes ``model`` by ``score`` with a layer ``scope``, now (:meth:`prune`) or on a
    ``schedule`` (:meth:`step`), optionally swaps connections by a ``regrowth`` rule, and keeps
    pruned weights and their optimizer state at zero.

    Args:
        model: any ``nn.Module`` (DDP / compiled wrappers are unwrapped). One sparsifier
            manages a parameter at a time: a second one on the same parameters is refused
            unless ``takeover=True`` (or the first one was closed with :meth:`close`).
        optimizer: the ``torch.optim`` optimizer that trains the model, or None (pruning
            only, or a loop that masks optimizer state itself); its per-weight state is
            masked. It must hold every prunable parameter that requires grad (checked here
            and when ``sparsifier.optimizer`` is assigned).
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
        batches: for rules and scores that need data: an iterable of ``(x, y)`` batches that
            can be iterated again, e.g. an unshuffled ``DataLoader`` or a list (a zero-argument
            callable returning one is accepted too; see :func:`secateurs.outputs.batch_source`).
            It must yield the same sequence on every pass so that a resumed run draws the same
            batches.
        takeover: manage parameters another live sparsifier manages: that one is closed
            (see :meth:`close`) once this one is built.
    """

    #: when the method prunes relative to training: "after" (prune a trained network, then
    #: fine-tune), "init" (prune before training) or "during" (its schedule runs in training)
    timing: ClassVar[str] = "after"
    #: without a schedule, the masks stay dense until :meth:`prune`, so :meth:`step` before it
    #: warns once (False for methods whose dense phase is by design, e.g. IMP's round 0)
    warn_dense_step: ClassVar[bool] = True
    #: attributes of a subclass that belong to its plan (checked by :meth:`load_state_dict`)
    _plan_fields: ClassVar[tuple[str, ...]] = ()

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
        takeover: bool = False,
    ):
        if sparsity is not None:
            check_sparsity(sparsity)
        check_sparsity(initial_sparsity, "initial_sparsity")
        scope, initial_scope = SCOPES.check(scope, "scope"), SCOPES.check(initial_scope, "initial_scope")
        if (regrowth is None) != (swap_schedule is None):
            raise ConfigError("regrowth and swap_schedule go together: give both (dynamic sparse training) or neither")
        batches = batch_source(batches)
        self.model = model
        self.masks = Masks(model, include, exclude, types)
        self._closed = False
        self._taken_from = self._check_owners(takeover)
        self.optimizer = optimizer  # checked: it must hold the prunable parameters
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
        self._initial = (initial_sparsity, initial_scope) if initial_sparsity > 0 else None
        # the one flag step() reads: True while step() has something to check (closed, or
        # the dense-before-prune warning still pending)
        self._step_check = self.warn_dense_step and schedule is None and swap_schedule is None
        if initial_sparsity > 0:
            self._prune(initial_sparsity, random_score, initial_scope, kind="init")

    # -- guards ----------------------------------------------------------------------------
    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self._optimizer

    @optimizer.setter
    def optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        if optimizer is not None:
            groups = getattr(optimizer, "param_groups", None)
            if groups is None or not hasattr(optimizer, "state"):
                raise ConfigError(
                    f"optimizer must be a torch.optim optimizer (with param_groups and state), got "
                    f"{type(optimizer).__name__}; pass the optimizer that trains the model, or None"
                )
            held = {id(p) for group in groups for p in group["params"]}
            missing = [n for n, p in self.masks.params.items() if p.requires_grad and id(p) not in held]
            if missing:
                total = len(self.masks.params)
                raise ConfigError(
                    f"the optimizer does not hold {len(missing)} of the {total} prunable parameters of "
                    f"{type(self.model).__name__} ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}), "
                    "so they would never train; was it built over another model's parameters? Build it from this "
                    "model (e.g. torch.optim.SGD(model.parameters(), lr=...)), or leave those parameters out "
                    "with exclude=[...] (or freeze them with requires_grad_(False))"
                )
        self._optimizer = optimizer

    def _check_owners(self, takeover: bool) -> list["Sparsifier"]:
        """The live sparsifiers that manage some of these parameters; raises unless
        ``takeover``. Runs before this constructor changes any weight."""
        def held() -> dict[int, tuple[Sparsifier, list[str]]]:
            found: dict[int, tuple[Sparsifier, list[str]]] = {}
            for name, p in self.masks.params.items():
                owner = _owner_of(p)
                if owner is not None and owner is not self:
                    found.setdefault(id(owner), (owner, []))[1].append(name)
            return found

        if held():  # (the dict it returns, holding the owners, is gone before the collection)
            gc.collect()  # a sparsifier in a reference cycle may be garbage not yet collected
        found = held()
        if found and not takeover:
            owner, names = next(iter(found.values()))
            raise ConfigError(
                f"{len(names)} of the {len(self.masks)} prunable parameters of {type(self.model).__name__} "
                f"({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}) are already managed by "
                f"{owner.describe()}, built earlier on this model; two sparsifiers on one model overwrite each "
                f"other's masks. Keep using that one, call its close() first, or pass takeover=True to "
                f"{type(self).__name__}(...) to close it and manage them with this one"
            )
        return [owner for owner, _ in found.values()]

    def _claim(self) -> None:
        """Record this sparsifier as the manager of its parameters (called once the whole
        constructor has succeeded); a takeover closes the previous managers now."""
        for owner in self._taken_from:
            owner.close()
        self._taken_from = []
        for key in [k for k, (p, s) in _OWNERS.items() if p() is None or s() is None]:
            del _OWNERS[key]
        me = weakref.ref(self)
        for p in self.masks.params.values():
            _OWNERS[id(p)] = (weakref.ref(p), me)

    def close(self) -> None:
        """Stop managing the model's parameters: the weights keep their current (pruned)
        values, another sparsifier may be built on them, and this one's :meth:`step` and
        :meth:`prune` raise from now on."""
        if self._closed:
            return
        self._closed = True
        self._step_check = True
        for p in self.masks.params.values():
            entry = _OWNERS.get(id(p))
            if entry is not None and entry[1]() is self:
                del _OWNERS[id(p)]

    @property
    def closed(self) -> bool:
        return self._closed

    def _refuse_if_closed(self, call: str) -> None:
        if self._closed:
            raise SecateursError(
                f"{call} on a closed {type(self).__name__}: it no longer manages the model (closed, or taken over "
                "by another sparsifier); call it on the sparsifier that manages the model now"
            )

    def _check_step(self) -> None:
        """The rare part of :meth:`step`, reached only while ``_step_check`` is set."""
        self._refuse_if_closed("step()")
        if not self.history:
            warnings.warn(
                f"{type(self).__name__}.step() before any pruning: without a schedule this sparsifier prunes only "
                "when prune() is called, so until then the model trains dense. Call prune() first (at-init methods: "
                "before training; magnitude: after training, then fine-tune), or give it a schedule",
                UsageWarning, stacklevel=3,
            )
        self._step_check = False

    def plan(self) -> dict[str, Any]:
        """What this sparsifier was built to do (method, sparsity, scope, schedules, rules,
        layer selection); saved in :meth:`state_dict` so a checkpoint of another plan is
        refused on load."""
        plan: dict[str, Any] = {
            "method": type(self).__name__,
            "score": _spec(self.score) if type(self) is Sparsifier else None,
            "sparsity": self.target,
            "scope": self.scope,
            "schedule": _spec(self.schedule),
            "regrowth": _spec(self.regrowth),
            "swap_schedule": _spec(self.swap_schedule),
            "initial": _spec(self._initial),
            "fixed_sparsity": _spec(self.fixed_sparsity),
            "allow_layer_collapse": self.allow_layer_collapse or None,
        }
        for cls in reversed(type(self).__mro__):
            for name in cls.__dict__.get("_plan_fields", ()):
                plan[name] = _spec(getattr(self, name, None))
        return plan

    def describe(self) -> str:
        """One line: the method and its plan, e.g. ``Magnitude(sparsity=0.9, scope='global')``."""
        return _render(self.plan())

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
        self._refuse_if_closed("prune()")
        target = self.target if sparsity is None else sparsity
        if target is None:
            raise ConfigError("no sparsity given: pass prune(sparsity=...) or Sparsifier(sparsity=...)")
        check_sparsity(target)
        self._prune(target, self.score, self.scope)
        return self.masks.stats()

    def step(self) -> None:
        """Call after every ``optimizer.step()``: re-zero pruned weights / state, and prune or
        swap connections when the schedules say so. Warns once (:class:`UsageWarning`) if
        called before a sparsifier without schedule has pruned: the model would stay dense."""
        if self._step_check:
            self._check_step()
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
        self._step_check = self._closed

    def _next_batch(self) -> tuple:
        if self.batches is None:
            raise ConfigError(
                f"{type(self).__name__} needs data: pass batches=<an iterable of (x, y) batches, e.g. an "
                "unshuffled DataLoader>"
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
        raise ConfigError("batches gave an empty iterable; it must yield (x, y) batches")

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
            "plan": self.plan(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Resume from :meth:`state_dict`; refuses the state of another model, and of a
        sparsifier built for another plan (method, sparsity, scope, schedules, ...), showing
        both. (States saved before plans were recorded load without the plan check.)"""
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            raise CheckpointError("not a secateurs sparsifier state (missing or unknown 'format' tag)")
        self.masks.check_state(state["masks"])  # another model: the more basic mismatch, reported first
        self._check_plan(state.get("plan"))
        self.masks.load_state_dict(state["masks"])
        self.steps = int(state["steps"])
        self.generator.set_state(state["generator"])
        self.history = list(state["history"])
        self._fast_forward(int(state.get("batches_used", 0)))
        self.masks.apply_()
        self._step_check = self._closed or (self._step_check and not self.history)

    def _check_plan(self, saved: Mapping | None) -> None:
        if saved is None:
            return
        # a scope saved under its old spelling ('layerwise') is the same plan
        saved = {k: SCOPES.aliases.get(v, v) if k in ("scope", "imp_scope") and isinstance(v, str) else v
                 for k, v in saved.items()}
        mine = self.plan()
        if dict(saved) == mine:
            return
        keys = list(dict.fromkeys([*mine, *saved]))
        differ = [k for k in keys if saved.get(k) != mine.get(k)]
        shown = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, this sparsifier {mine.get(k)!r}" for k in differ[:4])
        raise CheckpointError(
            f"this state was saved by a sparsifier with another plan ({shown}). The checkpoint is for "
            f"{_render(saved)}; this sparsifier is {_render(mine)}. Build the sparsifier with the checkpoint's "
            "settings to resume it, or start a new run"
        )

    def _fast_forward(self, used: int) -> None:
        """Draw the batches an interrupted run had drawn, so the next one is the same."""
        self._batch_iter, self._batches_used = None, 0
        for _ in range(used):
            self._next_batch()

