"""i-SpaSP: structured pruning as sparse signal recovery (Wolfe, Wang & Kyrillidis, "i-SpaSP:
Structured Neural Pruning via Sparse Signal Recovery", L4DC 2022, arXiv 2112.04905).

A group's units (hidden neurons, conv filters) are atoms; the signal to recover is what the
group's *consumers* (the layers reading its channels) compute from them on data. For a kept set
``S`` of ``s`` units, with ``X`` the consumers' input over the data batches and ``X_S`` the same
input with every unit outside ``S`` zeroed, the residual is ``R = c(X) - c(X_S)`` (consumer
pre-activations; the bias cancels). Starting from ``S = {}``, each iteration does
(CoSaMP-like, as the paper's Algorithm):

1. *identify*: the proxy ``z_u = <d c(X * m) / d m_u, R>`` at the all-ones gate ``m``, i.e. the
   correlation of unit ``u``'s contribution with the residual, obtained by automatic
   differentiation of ``1/2 ||c(X * m) - c(X_S)||^2`` (the pruned output detached) with respect
   to a per-unit gate ``m``; ``Omega`` = the ``2s`` units with the largest (signed) ``z``;
2. *merge*: ``T = Omega | S``;
3. *prune (threshold)*: ``S`` = the ``s`` units of ``T`` with the largest contribution size
   ``a_u = sqrt(sum over consumers of ||X[..., u]||^2 * ||W[:, u]||^2)``;
4. *update*: recompute ``R`` for the new ``S``.

It stops after ``iterations`` iterations or when ``S`` no longer changes (the smallest kept
size never decreases, so it always stops), and returns the iterate with the smallest residual
(``||R||^2`` per iterate is kept in :attr:`ISpaSPSelection.history`).

Where this follows the authors and where it chose (the authors' public ResNet-34 code, read for
reference, and the abstract; the paper's text was not available):

* identify: the authors differentiate with respect to the hidden representation ``H`` and sum
  the gradient over samples (``sum_b (R W)_{b,u}``); here the gradient is taken with respect to a
  per-unit gate, which multiplies that gradient by ``H`` before summing, so ``z_u`` is exactly
  the inner product of unit ``u``'s atom with the residual (CoSaMP's proxy ``A^T r``), and a unit
  that is silent on the data scores zero. The top ``2s`` (signed, descending) is theirs.
* threshold: the authors keep the ``s`` units of ``T`` with the largest summed dense activation
  ``sum_b H_{b,u}``; here the activation norm is multiplied by the norm of the unit's outgoing
  weights, so a unit whose outgoing weights are zero is never kept for its activations alone.
  ``a_u`` is the exact norm of the unit's contribution for a Linear consumer reading one feature
  per unit, and an upper bound (Cauchy-Schwarz) for convolutions and flattened channels.
* no re-estimation: CoSaMP solves a least-squares problem on ``T``; i-SpaSP keeps the dense
  weights of the kept units, and so does this (removal is the library's :func:`remove_units`).
* returning the best iterate rather than the last one is this implementation's choice.
* multi-layer: groups are pruned one after another, in the dependency graph's order (the order
  the trace meets their producers, input to output for a feed-forward network), as the paper
  prunes layer by layer: each group's data ``X`` comes from the network with the groups before it
  already pruned (their removed units zeroed at their consumers' inputs, which is what removal
  does), and its target is the dense consumer applied to that ``X`` (as the authors' code feeds
  each block the pruned network's activations).
* the residual is measured on the consumers' pre-activations (the next layer's output before
  its nonlinearity), over all consumers of a group jointly (a residual stream is read by many).

Consumers must be ``nn.Linear`` or ungrouped ``nn.Conv1d/2d/3d`` layers; anything else reading a
group's channels is refused with the group's name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..layers import layer_type, registered_layers
from ..outputs import batch_pass, call_model, split_batch
from ..validate import check_int
from .graph import DependencyGraph, Group
from .importance import Scores, SelectionImportance

__all__ = ["ISpaSP", "ISpaSPSelection", "ispasp_select", "NO_DATA_MESSAGE"]

NO_DATA_MESSAGE = (
    "i-SpaSP selects units by the residual of the pruned layer outputs on data, so it needs "
    "batches: pass importance=ISpaSP(batches) with batches an iterable of (inputs, targets), e.g. "
    "itertools.islice(train_loader, 10) (in a config: structured.importance: ispasp, which reads "
    "structured.taylor_batches probe batches)"
)


@dataclass
class ISpaSPSelection:
    """What :func:`ispasp_select` chose: kept unit indices per group, and per group the squared
    residual norm ``||R||^2`` after each iteration (``history[g][0]`` is the empty set's)."""

    kept: dict[str, list[int]]
    history: dict[str, list[float]] = field(default_factory=dict)
    sizes: dict[str, torch.Tensor] = field(default_factory=dict)


def _inputs(batches: Any) -> list[Any]:
    it = batch_pass(batches, "i-SpaSP batches")
    if it is None:
        raise ConfigError(NO_DATA_MESSAGE)
    out = []
    for batch in it:
        x = split_batch(batch)[0] if isinstance(batch, (tuple, list, Mapping)) else batch
        out.append(x)
    if not out:
        raise ConfigError("i-SpaSP got an empty iterable of batches; pass at least one (inputs, targets) batch")
    return out


def _consumers(model: nn.Module, group: Group) -> list[tuple[nn.Module, list[list[int]]]]:
    found = []
    for s in group.slices:
        if s.role != "in":
            continue
        m = model.get_submodule(s.module)
        _layout(m, s.module, group)
        found.append((m, [list(ix) for ix in s.indices]))
    if not found:
        raise ConfigError(f"group {group.name!r} has no registered layer reading it, so i-SpaSP has no residual to measure")
    return found


def _layout(m: nn.Module, name: str = "", group: Group | None = None) -> tuple[int, int, int]:
    """How consumer ``m`` reads its input, by its registered layer type
    (:func:`secateurs.layers.layer_type`), not its class: ``(axis of the input's features, number
    of input features, axis of the weight indexing them)``. A 2-D weight (Linear, transformers'
    Conv1D, a registered matrix layer) reads the input's last axis; a conv weight ``[out, in, *k]``
    reads channels on axis 1 and must be ungrouped."""
    kind = layer_type(m)
    where = f"{name!r} (a {type(m).__name__})" + (f" reads group {group.name!r}" if group is not None else "")
    if kind is None:
        raise ConfigError(
            f"i-SpaSP measures the residual at the layers reading a group's channels, but {where} and is not a "
            f"registered layer type ({', '.join(registered_layers())}); register it with "
            "secateurs.layers.register_layer, exclude the group's producers, or use importance='l1'")
    w = getattr(m, kind.param)
    if w.dim() == 2:
        return -1, w.shape[1 - kind.output_axis], 1 - kind.output_axis
    if kind.output_axis != 0 or getattr(m, "groups", 1) != 1:
        raise ConfigError(
            f"i-SpaSP needs a consumer whose weight is [out, in, ...] and reads every input channel, but {where} "
            f"has output axis {kind.output_axis} and groups={getattr(m, 'groups', 1)}; exclude the group's "
            "producers or use importance='l1'")
    return 1, w.shape[1], 1


def _feature_axis(m: nn.Module) -> int:
    return _layout(m)[0]


def _unit_matrix(indices: list[list[int]], features: int, dtype) -> torch.Tensor:
    """(features, units) 0/1 matrix: which input features belong to which unit."""
    e = torch.zeros(features, len(indices), dtype=dtype)
    for u, ix in enumerate(indices):
        if ix:
            e[ix, u] = 1.0
    return e


class _Masks:
    """Forward pre-hooks zeroing removed units at the inputs of a group's consumers."""

    def __init__(self):
        self.handles = []

    def add(self, consumers, keep: torch.Tensor) -> None:
        for m, indices in consumers:
            features = _layout(m)[1]
            gate = (_unit_matrix(indices, features, torch.float32) @ keep.float()).clamp(max=1.0)
            covered = _unit_matrix(indices, features, torch.float32).sum(1) > 0
            gate = torch.where(covered, gate, torch.ones_like(gate))
            axis = _feature_axis(m)

            def hook(module, args, gate=gate, axis=axis):
                x = args[0]
                shape = [1] * x.dim()
                shape[axis] = -1
                return (x * gate.to(x.device, x.dtype).view(shape), *args[1:])

            self.handles.append(m.register_forward_pre_hook(hook))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def _capture(model: nn.Module, inputs: list[Any], modules: list[nn.Module]) -> list[torch.Tensor]:
    seen: dict[int, list[torch.Tensor]] = {id(m): [] for m in modules}
    handles = [m.register_forward_pre_hook(lambda mod, args: seen[id(mod)].append(args[0].detach()))
               for m in modules]
    try:
        for x in inputs:
            call_model(model, x)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(seen[id(m)]) for m in modules]


def _gated(m: nn.Module, x: torch.Tensor, unit_of: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Consumer ``m`` applied to ``x`` with each feature multiplied by its unit's gate (1 outside the group)."""
    g = unit_of @ gate + (unit_of.sum(1) == 0).to(gate.dtype)
    shape = [1] * x.dim()
    shape[_feature_axis(m)] = -1
    return m(x * g.view(shape))


def _select_group(model, group: Group, inputs, keep: int, iterations: int, expand: float):
    consumers = _consumers(model, group)
    xs = _capture(model, inputs, [m for m, _ in consumers])
    units = group.units
    maps = []
    size_sq = torch.zeros(units, dtype=torch.float64)
    for (m, indices), x in zip(consumers, xs):
        unit_of = _unit_matrix(indices, x.shape[_feature_axis(m)], x.dtype).to(x.device)
        maps.append(unit_of)
        feat = x.movedim(_feature_axis(m), 0).reshape(x.shape[_feature_axis(m)], -1)
        x_sq = (feat.double() ** 2).sum(1) @ unit_of.double()
        _, _, w_axis = _layout(m)
        weight = getattr(m, layer_type(m).param).detach().double()
        w = weight.movedim(w_axis, 0).reshape(x.shape[_feature_axis(m)], -1)
        w_sq = (w**2).sum(1) @ unit_of.double()
        size_sq += (x_sq * w_sq).cpu()
    sizes = size_sq.sqrt()
    ones = torch.ones(units, dtype=xs[0].dtype, device=xs[0].device)
    with torch.no_grad():
        dense = [_gated(m, x, u, ones) for (m, _), x, u in zip(consumers, xs, maps)]

    def residual(kept: list[int]) -> list[torch.Tensor]:
        mask = torch.zeros_like(ones)
        mask[kept] = 1.0
        with torch.no_grad():
            return [d - _gated(m, x, u, mask) for d, (m, _), x, u in zip(dense, consumers, xs, maps)]

    order = sorted(range(units), key=lambda u: (-float(sizes[u]), u))
    rank = {u: r for r, u in enumerate(order)}
    kept: list[int] = []
    res = residual(kept)
    history = [float(sum((r.double() ** 2).sum() for r in res))]
    best = (history[0], kept) if keep == 0 else (float("inf"), kept)
    width = min(units, max(1, int(round(expand * keep))))
    for _ in range(iterations):
        gate = ones.clone().requires_grad_(True)
        inner = sum((_gated(m, x, u, gate) * r).sum() for (m, _), x, u, r in zip(consumers, xs, maps, res))
        (z,) = torch.autograd.grad(inner, gate)
        z = z.detach().double().cpu()
        omega = torch.sort(-z, stable=True).indices[:width].tolist()
        merged = set(omega) | set(kept)
        new = sorted(sorted(merged, key=rank.__getitem__)[:keep])
        res = residual(new)
        history.append(float(sum((r.double() ** 2).sum() for r in res)))
        if history[-1] < best[0]:
            best = (history[-1], new)
        if new == kept:
            break
        kept = new
    return best[1], history, sizes


def ispasp_select(
    model: nn.Module,
    graph: DependencyGraph,
    batches: Any,
    keep: Mapping[str, int],
    *,
    iterations: int = 20,
    expand: float = 2.0,
) -> ISpaSPSelection:
    """Run i-SpaSP on the groups named in ``keep`` (``{group: units to keep}``), one group after
    another in the graph's order; see the module docstring for the formulation. ``expand`` is the
    identify step's width as a multiple of ``s`` (the paper's 2). The model is not changed."""
    check_int(iterations, "i-SpaSP iterations", minimum=1)
    if not expand >= 1:
        raise ConfigError(f"i-SpaSP expand must be >= 1 (the identify step takes expand * s units), got {expand!r}")
    inputs = batches if isinstance(batches, _Inputs) else _Inputs(_inputs(batches))
    names = [g.name for g in graph.prunable]
    for name in keep:
        if name not in names:
            graph.group(name)  # raises with the known names
            raise ConfigError(f"group {name!r} cannot be pruned: {graph.frozen.get(name)}")
    masks = _Masks()
    selection = ISpaSPSelection(kept={})
    was_training = model.training
    model.eval()
    try:
        for group in graph.prunable:
            if group.name not in keep:
                continue
            s = keep[group.name]
            check_int(s, f"units to keep in group {group.name!r}", minimum=1, maximum=group.units)
            if s == group.units:
                kept, history, sizes = list(range(group.units)), [0.0], torch.zeros(group.units)
            else:
                kept, history, sizes = _select_group(model, group, inputs.items, s, iterations, expand)
            selection.kept[group.name] = kept
            selection.history[group.name] = history
            selection.sizes[group.name] = sizes
            mask = torch.zeros(group.units)
            mask[kept] = 1.0
            masks.add(_consumers(model, group), mask)
    finally:
        masks.remove()
        model.train(was_training)
    return selection


class _Inputs:
    def __init__(self, items: list[Any]):
        self.items = items


class ISpaSP(SelectionImportance):
    """i-SpaSP as a structured importance: ``prune_channels(model, x, 0.5, importance=ISpaSP(batches))``,
    ``prune_to_flops(..., importance=ISpaSP(batches))``. The batches (``(inputs, targets)``
    pairs, or a zero-argument callable returning an iterable of them) are read once and kept.
    Only per-group removal counts are meaningful (``scope='uniform'`` or an explicit
    ``{group: n_remove}``): i-SpaSP chooses a set of a given size rather than ranking units.
    """

    def __init__(self, batches: Any = None, *, iterations: int = 20, expand: float = 2.0):
        self.inputs = _Inputs(_inputs(batches))
        check_int(iterations, "i-SpaSP iterations", minimum=1)
        self.iterations, self.expand = iterations, expand
        self.last: ISpaSPSelection | None = None
        self._cache: dict[tuple, Scores] = {}

    def scores_for(self, model: nn.Module, graph: DependencyGraph, remove: Mapping[str, int]) -> Scores:
        """Scores whose ``remove[g]`` lowest units are exactly those i-SpaSP drops: kept units
        score ``1 + a_u / max a`` and dropped ones ``a_u / max a`` (``a``: contribution size)."""
        key = (id(model), tuple(sorted((k, int(v)) for k, v in remove.items())))
        if key in self._cache:
            return self._cache[key]
        keep = {g.name: g.units - int(remove.get(g.name, 0)) for g in graph.prunable}
        keep = {k: v for k, v in keep.items() if v < graph.group(k).units}
        selection = ispasp_select(model, graph, self.inputs, keep, iterations=self.iterations, expand=self.expand)
        self.last = selection
        scores: Scores = {}
        for g in graph.prunable:
            if g.name not in selection.kept:
                scores[g.name] = torch.ones(g.units)
                continue
            sizes = selection.sizes[g.name].float()
            s = sizes / sizes.max().clamp(min=torch.finfo(torch.float32).tiny)
            s[selection.kept[g.name]] += 1.0
            scores[g.name] = s
        self._cache = {key: scores}
        return scores
