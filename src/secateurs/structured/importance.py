"""Channel importance per group: one score per unit, lower means "remove first".

Every criterion reads the slices a group owns, so a channel shared by several layers
(a residual stream) is judged by all of them:

* ``l1``: the L1 norm of each output filter (Li et al., 2017, "Pruning Filters for
  Efficient ConvNets"). Each producer layer's filter norms are divided by that layer's
  mean filter norm, then a unit's score is the *mean* over the producer layers that
  contain it. Dividing makes layers of different fan-in comparable; the mean (rather than
  the sum) keeps a residual channel written by many layers from looking important merely
  because it has more filters.
* ``bn_scale``: ``|gamma|`` of the BatchNorm after each channel, mean over the group's BN
  layers (Liu et al., 2017, "network slimming").
* :func:`taylor_importance`: first-order Taylor estimate of the loss change when a channel
  is removed, ``(sum over the channel's parameters of g * w)^2`` per mini-batch, averaged
  over batches (Molchanov et al., 2019, Eq. 8 with the per-batch square of Sec. 3). The
  channel's parameters are its producer filters and biases and its BN weight and bias.
"""
from __future__ import annotations

import abc
from typing import Callable, Iterable, Mapping

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..outputs import batch_pass, call_model, split_batch, task_loss
from ..registry import Registry
from .graph import DependencyGraph, Group

__all__ = [
    "IMPORTANCE", "l1_importance", "bn_scale_importance", "taylor_importance", "resolve_scores",
    "SelectionImportance", "NEEDS_DATA",
]

Scores = dict[str, torch.Tensor]
IMPORTANCE: Registry[Callable[[nn.Module, DependencyGraph], Scores]] = Registry("structured importance")

_PRODUCER_ROLES = ("out", "depthwise")

#: Criteria that need data, by name: what to pass instead of the bare name.
NEEDS_DATA = {
    "taylor": "pass importance=taylor_importance(model, graph, batches) scores",
    "ispasp": "pass importance=ISpaSP(batches) (secateurs.structured.ISpaSP) with an iterable of (inputs, targets) batches",
}


class SelectionImportance(abc.ABC):
    """An importance whose scores depend on how many units each group keeps: a criterion that
    *selects a set* of a given size (e.g. i-SpaSP's sparse recovery) rather than ranking units
    once. :func:`~secateurs.structured.prune.plan_for` asks it for scores at each removal count
    (``prune_to_flops`` does so for every bisection step); the ``n`` lowest-scoring units of a
    group must be the ``n`` it would remove."""

    @abc.abstractmethod
    def scores_for(self, model: nn.Module, graph: DependencyGraph, remove: Mapping[str, int]) -> Scores:
        """Scores per prunable group for removing ``remove[g]`` units of group ``g`` (absent: 0)."""


def _mean_over_slices(group: Group, per_slice: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """Mean over the slices covering each unit of the mean of that slice's values."""
    total = torch.zeros(group.units, dtype=torch.float64)
    count = torch.zeros(group.units, dtype=torch.float64)
    for k, values in per_slice.items():
        for u, idx in enumerate(group.slices[k].indices):
            if idx:
                total[u] += values[list(idx)].double().mean()
                count[u] += 1
    return (total / count.clamp(min=1)).float()


@IMPORTANCE.register("l1", "L1 norm of output filters (Li et al., 2017)")
def l1_importance(model: nn.Module, graph: DependencyGraph) -> Scores:
    scores: Scores = {}
    for group in graph.prunable:
        per_slice = {}
        for k, s in enumerate(group.slices):
            if s.role in _PRODUCER_ROLES:
                w = model.get_submodule(s.module).weight.detach()
                norms = w.abs().flatten(1).sum(1)
                per_slice[k] = norms / norms.mean().clamp(min=torch.finfo(norms.dtype).tiny)
        scores[group.name] = _mean_over_slices(group, per_slice)
    return scores


@IMPORTANCE.register("bn_scale", "|gamma| of BatchNorm (Liu et al., 2017, network slimming)")
def bn_scale_importance(model: nn.Module, graph: DependencyGraph) -> Scores:
    scores: Scores = {}
    for group in graph.prunable:
        per_slice = {}
        for k, s in enumerate(group.slices):
            bn = model.get_submodule(s.module)
            if s.role == "bn" and getattr(bn, "weight", None) is not None:
                per_slice[k] = bn.weight.detach().abs()
        if not per_slice:
            raise ConfigError(
                f"bn_scale needs an affine BatchNorm on every pruned channel, but group "
                f"{group.name!r} has none; use importance='l1' or exclude {group.producers}"
            )
        scores[group.name] = _mean_over_slices(group, per_slice)
    return scores


def _channel_params(model: nn.Module, group: Group) -> list[tuple[int, torch.Tensor]]:
    """(slice index, parameter) pairs of a group's producer side: filters, biases, BN affine."""
    found = []
    for k, s in enumerate(group.slices):
        if s.role in _PRODUCER_ROLES or s.role == "bn":
            m = model.get_submodule(s.module)
            for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
                if isinstance(p, nn.Parameter):
                    found.append((k, p))
    return found


def taylor_importance(
    model: nn.Module,
    graph: DependencyGraph,
    batches: Iterable,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    order: int = 1,
) -> Scores:
    """Taylor importance of each channel (Molchanov et al., 2019) over ``batches`` (an
    iterable of ``(x, y)`` batches, all of which are read; a zero-argument callable returning
    one is accepted too).

    With c_b = sum of g*w over the channel's parameters on batch b: ``order=1`` is their
    first-order criterion, the mean of c_b^2. ``order=2`` adds the second-order term of the
    loss change when the channel is removed, dL = -g.w + w.H.w / 2, with the Hessian
    approximated by the (batch-)Fisher, w.H.w ~ mean(c_b^2): the score is
    (mean(c_b) - mean(c_b^2) / 2)^2. (Molchanov et al. approximate H with per-sample
    gradients; per-batch gradients are cheaper and what a training loop already has.)

    Runs in the model's current mode (BN statistics update in train mode; call
    ``model.eval()`` first to leave them alone). Gradients come from
    ``torch.autograd.grad``, so existing ``.grad`` fields are untouched. Batches, outputs and
    the default loss follow :mod:`secateurs.outputs`; ``loss_fn(logits, targets)`` overrides it.
    """
    if order not in (1, 2):
        raise ConfigError(f"taylor_importance order must be 1 or 2, got {order!r}")
    groups = graph.prunable
    if not groups:
        raise ConfigError(
            "taylor_importance: the dependency graph has no prunable channel group, so there is nothing "
            "to score; graph.frozen maps each group to the reason it may not be pruned"
        )
    batches = batch_pass(batches, "taylor_importance batches")
    if batches is None:
        raise ConfigError("taylor_importance needs batches: an iterable of (x, y) batches, e.g. a few of a DataLoader")
    per_group = {g.name: _channel_params(model, g) for g in groups}
    params = list({id(p): p for pairs in per_group.values() for _, p in pairs}.values())
    sums = {g.name: torch.zeros(g.units, dtype=torch.float64) for g in groups}
    firsts = {g.name: torch.zeros(g.units, dtype=torch.float64) for g in groups}
    n = 0
    for batch in batches:
        x, y = split_batch(batch)
        loss = task_loss(model, call_model(model, x), y, x, loss_fn)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        gw = {id(p): (g * p).detach() if g is not None else torch.zeros_like(p) for p, g in zip(params, grads)}
        for g in groups:
            contribution = torch.zeros(g.units, dtype=torch.float64)
            for k, p in per_group[g.name]:
                per_channel = gw[id(p)].flatten(1).sum(1) if p.dim() > 1 else gw[id(p)]
                for u, idx in enumerate(g.slices[k].indices):
                    if idx:
                        contribution[u] += per_channel[list(idx)].double().sum()
            sums[g.name] += contribution**2
            firsts[g.name] += contribution
        n += 1
    if n == 0:
        raise ConfigError("taylor_importance needs at least one (x, y) batch; the iterable was empty")
    if order == 1:
        return {name: (s / n).float() for name, s in sums.items()}
    return {name: (firsts[name] / n - sums[name] / (2 * n)).pow(2).float() for name in sums}


def resolve_scores(model: nn.Module, graph: DependencyGraph, importance) -> Scores:
    """Scores from a registered name, a callable ``(model, graph) -> scores`` or a mapping."""
    if isinstance(importance, SelectionImportance):
        raise ConfigError(
            f"{type(importance).__name__} chooses units for a given removal count, so it has no fixed "
            "scores; use plan_for / prune_channels / prune_to_flops, which ask it per count"
        )
    if isinstance(importance, str) and importance in NEEDS_DATA and importance not in IMPORTANCE:
        raise ConfigError(f"importance {importance!r} needs data: {NEEDS_DATA[importance]}")
    if isinstance(importance, str):
        scores = IMPORTANCE.get(importance)(model, graph)
    elif callable(importance):
        scores = importance(model, graph)
    elif isinstance(importance, Mapping):
        scores = dict(importance)
    else:
        raise ConfigError(
            f"importance must be a name ({', '.join(IMPORTANCE.names())}), a callable "
            f"(model, graph) -> {{group: scores}} or such a mapping, got {type(importance).__name__}"
        )
    for g in graph.prunable:
        s = scores.get(g.name)
        if s is None or tuple(torch.as_tensor(s).shape) != (g.units,):
            raise ConfigError(
                f"importance scores must give group {g.name!r} a vector of {g.units} values, got "
                f"{None if s is None else tuple(torch.as_tensor(s).shape)}; were they computed on "
                f"this model with the same exclude?"
            )
    return {k: torch.as_tensor(v, dtype=torch.float32) for k, v in scores.items()}
