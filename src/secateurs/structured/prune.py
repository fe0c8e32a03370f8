"""Structured pruning entry points: by ratio, by explicit counts, to a FLOPs target, or
lossless compaction of channels that are already all zero.

``prune_channels`` ranks each group's units by an importance score and removes the lowest,
either the same share of every group ("uniform", formerly "layerwise", as Li et al., 2017 prune each layer)
or by one ranking across groups ("global", as Molchanov et al., 2019; scores are first
divided by their group's mean so that groups of different scale compete fairly).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence, Union

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..validate import check_int, check_number
from .cost import model_cost
from .graph import DependencyGraph, Group, build_graph
from .importance import Scores, SelectionImportance, resolve_scores
from .rebuild import remove_units
from ..vocabulary import STRUCTURED_SCOPES

__all__ = ["plan_removal", "plan_for", "prune_channels", "compact_zero_channels", "prune_to_flops"]

Amount = Union[float, Mapping[str, int]]
Importance = Union[str, Mapping[str, torch.Tensor], Callable[[nn.Module, DependencyGraph], Scores], SelectionImportance]
SCOPES = STRUCTURED_SCOPES  # the subset of :data:`secateurs.vocabulary.SCOPES` channel pruning takes


def _check_ratio(ratio: float) -> float:
    check_number(
        ratio, "ratio", minimum=0.0, below=1.0,
        hint="it is the share of each group's channels to remove; to remove exact counts pass {group_name: n_remove}",
    )
    return float(ratio)


class _Budget:
    """Per-layer floor: every slice of a group keeps at least ``min_channels`` units.

    A residual stream's units are not all present in every layer (option-A shortcuts add
    channels per stage), so "keep one unit of the group" could still empty the stem conv.
    """

    def __init__(self, group: Group, min_channels: int):
        self.group = group
        self.min_channels = min_channels
        self.left = [sum(1 for ix in s.indices if ix) for s in group.slices]
        self.removed: list[int] = []

    def take(self, u: int) -> bool:
        touched = [k for k, s in enumerate(self.group.slices) if s.indices[u]]
        if any(self.left[k] - 1 < self.min_channels for k in touched):
            return False
        for k in touched:
            self.left[k] -= 1
        self.removed.append(u)
        return True


def _lowest(group: Group, scores: torch.Tensor, n: int, min_channels: int) -> list[int]:
    """The ``n`` lowest-scoring units that can go without emptying a layer (ties: lower index)."""
    budget = _Budget(group, min_channels)
    for u in torch.sort(scores, stable=True).indices.tolist():
        if len(budget.removed) == n:
            break
        budget.take(u)
    return sorted(budget.removed)


def _plan_counts(graph: DependencyGraph, scores: Scores, counts: Mapping[str, int], min_channels: int) -> dict[str, list[int]]:
    plan = {}
    for name, n in counts.items():
        group = graph.group(name)
        check_int(n, f"the number of channels to remove from {name!r}", minimum=0)
        if n >= group.units:
            raise ConfigError(
                f"asked to remove {n} of the {group.units} channels of group {name!r}, which would "
                f"disconnect the network; remove at most {group.units - min_channels}"
            )
        if n > group.units - min_channels:
            raise ConfigError(
                f"removing {n} of {group.units} channels from {name!r} leaves fewer than "
                f"min_channels={min_channels}; lower the count or min_channels"
            )
        if group.frozen is not None and n:
            raise ConfigError(f"group {name!r} cannot be pruned: {group.frozen}")
        if n:
            plan[name] = _lowest(group, scores[name], n, min_channels)
            if len(plan[name]) < n:
                raise ConfigError(
                    f"only {len(plan[name])} of the {n} channels asked can leave group {name!r} "
                    f"without leaving a layer with fewer than min_channels={min_channels}"
                )
    return plan


def _plan_global(graph: DependencyGraph, scores: Scores, ratio: float, min_channels: int) -> dict[str, list[int]]:
    groups = graph.prunable
    budget = math.floor(ratio * sum(g.units for g in groups) + 1e-9)
    entries = []
    for gi, g in enumerate(groups):
        s = scores[g.name].double()
        s = s / s.mean().clamp(min=1e-300)
        entries += [(float(v), gi, u) for u, v in enumerate(s.tolist())]
    entries.sort()
    budgets = {g.name: _Budget(g, min_channels) for g in groups}
    for _, gi, u in entries:
        if budget == 0:
            break
        if budgets[groups[gi].name].take(u):
            budget -= 1
    return {k: sorted(b.removed) for k, b in budgets.items() if b.removed}


def plan_removal(
    graph: DependencyGraph,
    scores: Scores,
    amount: Amount,
    scope: str = "uniform",
    min_channels: int = 1,
) -> dict[str, list[int]]:
    """Which units to remove: ``{group name: unit indices}``.

    A float ``amount`` removes ``floor(amount * units)`` per group ("uniform") or that share
    of all prunable units ranked together ("global"); every layer keeps at least
    ``min_channels`` of the group's channels (fewer are removed if needed). A mapping gives exact counts per group and raises rather than clamp.
    """
    check_int(min_channels, "min_channels", minimum=1)
    scope = STRUCTURED_SCOPES.check(scope, "scope")
    if isinstance(amount, Mapping):
        return _plan_counts(graph, scores, amount, min_channels)
    ratio = _check_ratio(amount)
    if scope == "global":
        return _plan_global(graph, scores, ratio, min_channels)
    plan = {}
    for g in graph.prunable:
        n = math.floor(ratio * g.units + 1e-9)
        if n > 0:
            plan[g.name] = _lowest(g, scores[g.name], n, min_channels)
    return plan


def plan_for(
    model: nn.Module,
    graph: DependencyGraph,
    importance: Importance,
    amount: Amount,
    scope: str = "uniform",
    min_channels: int = 1,
) -> dict[str, list[int]]:
    """:func:`plan_removal` with the scores of ``importance`` (a name, callable, mapping, or a
    :class:`SelectionImportance`, which is asked for the scores of exactly these removal counts:
    ``floor(amount * units)`` per group, or the mapping's counts)."""
    if not isinstance(importance, SelectionImportance):
        return plan_removal(graph, resolve_scores(model, graph, importance), amount, scope, min_channels)
    scope = STRUCTURED_SCOPES.check(scope, "scope")
    if isinstance(amount, Mapping):
        counts = {k: int(v) for k, v in amount.items()}
    else:
        if scope == "global":
            raise ConfigError(
                f"{type(importance).__name__} selects a set of a given size per group, so it has no "
                "scores to rank across groups; use scope='uniform' or pass {group: n_remove}"
            )
        ratio = _check_ratio(amount)
        counts = {g.name: math.floor(ratio * g.units + 1e-9) for g in graph.prunable}
    scores = importance.scores_for(model, graph, {k: v for k, v in counts.items() if v})
    scores = resolve_scores(model, graph, scores)
    return plan_removal(graph, scores, amount, scope, min_channels)


def prune_channels(
    model: nn.Module,
    example_input: torch.Tensor,
    amount: Amount,
    *,
    importance: Importance = "l1",
    exclude: Sequence[str] = (),
    min_channels: int = 1,
    scope: str = "uniform",
) -> nn.Module:
    """A new, physically smaller copy of ``model`` with the least important channels removed.

    ``amount``: share of channels per group in [0, 1) or ``{group name: n_remove}`` (names
    from :func:`build_groups`); ``importance``: ``"l1"``, ``"bn_scale"``, a callable
    ``(model, graph) -> {group: scores}``, precomputed scores (e.g. ``taylor_importance``) or
    a :class:`SelectionImportance` such as ``ISpaSP(batches)``.
    The copy keeps the model's class and module names; only a module that pads channels
    (option-A shortcut) becomes an fx ``GraphModule`` with the new pad amounts.
    """
    graph = build_graph(model, example_input, exclude)
    return remove_units(model, graph, plan_for(model, graph, importance, amount, scope, min_channels))


def _is_zero(t: torch.Tensor | None, idx: Sequence[int]) -> bool:
    return t is None or not bool(t.detach()[list(idx)].any())


def zero_units(model: nn.Module, graph: DependencyGraph) -> dict[str, list[int]]:
    """Units whose producer weights, biases and BN affine parameters are all exactly zero,
    and whose channel only passes through zero-preserving ops (ReLU, pooling, add, ...)."""
    found: dict[str, list[int]] = {}
    for g in graph.prunable:
        zero = []
        for u in range(g.units):
            if u in graph.unsafe_to_compact.get(g.name, ()):
                continue
            ok = True
            for s in g.slices:
                idx = s.indices[u]
                if s.role == "in" or s.role.startswith("param:") or not idx:
                    continue  # consumers, and per-channel scales of a channel that is already zero
                m = model.get_submodule(s.module)
                if not (_is_zero(m.weight, idx) and _is_zero(m.bias, idx)):
                    ok = False
                    break
            if ok:
                zero.append(u)
        if len(zero) == g.units:
            zero = zero[1:]  # a layer needs a channel; the one kept carries zeros
        if zero:
            found[g.name] = zero
    return found


def compact_zero_channels(
    model: nn.Module, example_input: torch.Tensor, exclude: Sequence[str] = ()
) -> nn.Module:
    """Remove exactly the channels that are already dead, so outputs are unchanged.

    This is the export step after training with channel masks (the masks zero a channel's
    filters and BN affine; here those channels physically disappear).
    """
    graph = build_graph(model, example_input, exclude)
    return remove_units(model, graph, zero_units(model, graph))


def prune_to_flops(
    model: nn.Module,
    example_input: torch.Tensor,
    flops_fraction_removed: float,
    *,
    importance: Importance = "l1",
    exclude: Sequence[str] = (),
    min_channels: int = 1,
    scope: str = "uniform",
    tolerance: float = 0.005,
    max_steps: int = 20,
) -> tuple[nn.Module, float]:
    """Bisect a uniform ratio until the pruned model has removed the requested share of MACs.

    Returns ``(pruned model, ratio)``. The removed share grows in steps (whole channels),
    so the result is the closest ratio found within ``tolerance`` or after ``max_steps``.
    """
    if not 0.0 <= flops_fraction_removed < 1.0:
        raise ConfigError(f"flops_fraction_removed must be in [0, 1), got {flops_fraction_removed!r}")
    graph = build_graph(model, example_input, exclude)
    if not isinstance(importance, SelectionImportance):
        importance = resolve_scores(model, graph, importance)  # score once, plan per ratio
    dense = model_cost(model, example_input).macs

    def attempt(ratio: float) -> tuple[nn.Module, float]:
        pruned = remove_units(model, graph, plan_for(model, graph, importance, ratio, scope, min_channels))
        return pruned, 1.0 - model_cost(pruned, example_input).macs / dense

    hi = 1.0 - 1e-9
    top, top_removed = attempt(hi)
    if top_removed + tolerance < flops_fraction_removed:
        raise ConfigError(
            f"pruning channels can remove at most {top_removed:.1%} of this model's MACs (input "
            f"and output layers and frozen groups {sorted(graph.frozen)} keep theirs), asked for "
            f"{flops_fraction_removed:.1%}; lower the target or min_channels"
        )
    return bisect_removal(attempt, flops_fraction_removed, hi, tolerance, max_steps, model)


def bisect_removal(attempt, target: float, hi: float, tolerance: float, max_steps: int, unpruned):
    """Bisect the knob of ``attempt(knob) -> (model, share removed)`` on ``[0, hi]`` towards
    ``target``; returns ``(model, knob)`` of the closest attempt (removal grows in whole units,
    so it stops within ``tolerance`` or after ``max_steps``)."""
    lo = 0.0
    best = (unpruned, 0.0, 0.0)  # (model, knob, removed)
    for _ in range(max_steps):
        mid = (lo + hi) / 2
        pruned, removed = attempt(mid)
        if abs(removed - target) < abs(best[2] - target):
            best = (pruned, mid, removed)
        if abs(removed - target) <= tolerance:
            break
        lo, hi = (mid, hi) if removed < target else (lo, mid)
    return best[0], best[1]
