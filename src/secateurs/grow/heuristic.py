"""Grow-and-prune architecture search for MLPs: add random neurons, prune the least useful,
deepen when the layers are wide for the connections around them.

A heuristic neural-architecture search in the spirit of "noisy" grow-and-prune NAS: no
controller and no supernet, only random growth kept in check by pruning, inside two limits
the user gives (``max_params``, ``max_depth``). It is written from the idea, not from a
paper's exact rules. Training happens outside (any loop); between training phases the
caller runs one **event**, which returns a new network and a record of what changed.

One event, on a ReLU MLP with input size ``n_in``, hidden widths ``w_1..w_D`` and ``n_out``
outputs (``a_l`` / ``b_l``: the number of units feeding / fed by hidden layer ``l``, so
``a_1 = n_in`` and ``b_D = n_out``):

1. **Prune.** Every hidden unit gets a usefulness score; the ``prune`` lowest-scoring units
   of the whole network are removed (ascending score, ties by layer then unit index), skipping
   a unit whose layer is down to ``min_width``. Scores:

   * ``taylor`` (default): the first-order Taylor estimate of the loss change when the unit's
     output is zeroed, ``|sum over a batch of a * dL/da|`` for its post-ReLU activation ``a``,
     averaged over ``usefulness_batches`` batches (Molchanov et al., 2017). It is in units of
     loss, so layers are ranked together as they are.
   * ``norm``: ``||incoming weights|| * ||outgoing weights||``, divided by the layer's mean so
     that layers of different fan-in compete fairly. Needs no data.

   Pruning comes first so that units added at the previous event have been trained before
   they are judged (a unit is added with zero outgoing weights, so both scores are 0 then).
2. **Deepen.** Layer ``l`` is *saturated* when ``w_l >= depth_ratio * (a_l + b_l)``: it has
   many units compared with the units it connects, so more width there mostly adds weights
   (each new unit costs ``a_l + b_l + 1`` parameters). When every hidden layer is saturated,
   the depth is below ``max_depth`` and the ``w^2 + w`` new parameters fit in ``max_params``,
   an identity layer (:func:`secateurs.grow.deepen.insert_identity_layer`, function
   preserving) is inserted right after the widest hidden layer ``k`` (ties: the first). This
   raises layer ``k``'s own threshold from ``depth_ratio * (a_k + b_k)`` to
   ``depth_ratio * (a_k + w_k)``, so the next event deepens again only if ``k`` is wide even for
   its new fan-out; at most one layer is added per event.
3. **Grow.** ``add`` units are added one at a time, each to a hidden layer drawn uniformly at
   random among those where one more unit keeps the parameter count ``<= max_params`` (the
   count is exact: ``sum over layers of (fan_in + 1) * fan_out``); when none fits, the rest
   are not added. New units get random Gaussian incoming weights scaled to ``init_scale``
   times the layer's mean incoming norm, zero bias and zero outgoing weights, so the
   network's output is unchanged (checked on the example input).

After an event the parameter count is ``<= max_params`` and the depth ``<= max_depth``
(a starting network above either is an error, never silently cut). The events draw from one
generator seeded with ``seed``, so a search is deterministic given the seed, the training and
the batches; :meth:`GrowPrune.state_dict` holds the generator, so a resumed search goes on
exactly. Every event returns a *new* model (pruning rebuilds smaller layers): an optimizer
must be rebuilt for it, and its state (momentum, Adam moments) starts from zero.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError, GrowthError
from ..outputs import batch_pass
from ..structured.graph import build_graph
from ..structured.rebuild import remove_units
from ..validate import check_int, check_number
from .deepen import MLPLayout, insert_identity_layer, mlp_layout
from .gradmax import new_unit_weights
from .widen import add_units, growth_site

__all__ = [
    "USEFULNESS", "GrowPruneConfig", "GrowPrune", "mlp_parameters", "unit_cost", "deepen_site",
    "lowest_units", "plan_growth", "unit_usefulness",
]

USEFULNESS = ("taylor", "norm")
_FORMAT = "secateurs.grow_prune/1"
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class GrowPruneConfig:
    """Meta-parameters of the search (see the module docstring for the rules).

    ``max_params``: parameter budget (weights and biases); ``max_depth``: most hidden layers;
    ``min_width``: pruning never takes a layer below it; ``add`` / ``prune``: units added /
    removed per event; ``usefulness``: ``taylor`` or ``norm``; ``usefulness_batches``: batches
    the Taylor score averages over; ``depth_ratio``: the saturation ratio of the depth rule;
    ``init_scale``: new incoming weights' norm as a multiple of the layer's mean; ``seed``.
    """

    max_params: int = 100_000
    max_depth: int = 4
    min_width: int = 4
    add: int = 32
    prune: int = 8
    usefulness: str = "taylor"
    usefulness_batches: int = 4
    depth_ratio: float = 0.1
    init_scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("max_params", 1), ("max_depth", 1), ("min_width", 1), ("add", 0),
                          ("prune", 0), ("usefulness_batches", 1)):
            value = getattr(self, name)
            check_int(value, f"grow_prune.{name}", minimum=low)
        check_int(self.seed, "grow_prune.seed")
        if self.add == 0 and self.prune == 0:
            raise ConfigError("grow_prune.add and grow_prune.prune are both 0, so the search never changes "
                              "the network; set at least one of them (e.g. add: 32, prune: 8)")
        if self.usefulness not in USEFULNESS:
            raise ConfigError(f"unknown grow_prune.usefulness {self.usefulness!r}; known: {', '.join(USEFULNESS)}")
        for name in ("depth_ratio", "init_scale"):
            value = getattr(self, name)
            hint = "to keep the depth fixed set max_depth to the starting depth" if name == "depth_ratio" else None
            check_number(value, f"grow_prune.{name}", above=0, finite=True, hint=hint)


# -- pure rules on widths ----------------------------------------------------------------------
def mlp_parameters(in_features: int, widths: Sequence[int], out_features: int) -> int:
    """Exact parameter count of an MLP with biases: ``sum of (fan_in + 1) * fan_out``."""
    sizes = [in_features, *widths, out_features]
    return sum((a + 1) * b for a, b in zip(sizes, sizes[1:]))


def unit_cost(in_features: int, widths: Sequence[int], out_features: int, layer: int) -> int:
    """Parameters one more unit in hidden layer ``layer`` adds: fan-in + bias + fan-out."""
    sizes = [in_features, *widths, out_features]
    return sizes[layer] + 1 + sizes[layer + 2]


def deepen_site(in_features: int, widths: Sequence[int], out_features: int, depth_ratio: float) -> Optional[int]:
    """The hidden layer to put an identity layer behind, or None while some layer is not
    saturated (``w_l < depth_ratio * (a_l + b_l)``); limits are the caller's business."""
    sizes = [in_features, *widths, out_features]
    if not all(w >= depth_ratio * (sizes[i] + sizes[i + 2]) for i, w in enumerate(widths)):
        return None
    return max(range(len(widths)), key=lambda i: (widths[i], -i))


def lowest_units(scores: Sequence[torch.Tensor], n: int, min_width: int) -> list[list[int]]:
    """Per layer, the sorted indices of the ``n`` lowest-scoring units of all layers together
    (ties: earlier layer, then lower index), never leaving a layer with fewer than
    ``min_width`` units; fewer than ``n`` when the floors stop it."""
    if min_width < 1:
        raise ConfigError(f"min_width must be >= 1 (a layer needs a unit), got {min_width!r}")
    for layer, s in enumerate(scores):
        if not bool(torch.isfinite(s).all()):
            raise ConfigError(f"usefulness scores of hidden layer {layer} are not finite; did the loss diverge?")
    entries = sorted((v, layer, u) for layer, s in enumerate(scores) for u, v in enumerate(s.double().tolist()))
    left = [len(s) for s in scores]
    chosen: list[list[int]] = [[] for _ in scores]
    taken = 0
    for _, layer, u in entries:
        if taken == n:
            break
        if left[layer] > min_width:
            chosen[layer].append(u)
            left[layer] -= 1
            taken += 1
    return [sorted(c) for c in chosen]


def plan_growth(
    in_features: int, widths: Sequence[int], out_features: int, n: int, max_params: int, generator: torch.Generator
) -> list[int]:
    """Units to add per hidden layer: ``n`` draws, each uniform over the layers where one more
    unit keeps the exact parameter count ``<= max_params`` (stops early when none fits)."""
    widths = list(widths)
    added = [0] * len(widths)
    params = mlp_parameters(in_features, widths, out_features)
    for _ in range(n):
        fits = [i for i in range(len(widths)) if params + unit_cost(in_features, widths, out_features, i) <= max_params]
        if not fits:
            break
        layer = fits[int(torch.randint(len(fits), (1,), generator=generator))]
        params += unit_cost(in_features, widths, out_features, layer)
        widths[layer] += 1
        added[layer] += 1
    return added


# -- usefulness ---------------------------------------------------------------------------------
def _consumer(model: nn.Module, layout: MLPLayout, layer: int) -> nn.Linear:
    seq = model.get_submodule(layout.sequential) if layout.sequential else model
    return seq[layout.linear_positions[layer + 1]]


def unit_usefulness(
    model: nn.Module,
    kind: str = "taylor",
    *,
    batches: Optional[Iterable[Batch]] = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> list[torch.Tensor]:
    """One score per unit of every hidden layer (in order); higher is more useful.

    ``taylor``: mean over ``batches`` of ``|sum over the batch of a * dL/da|`` (``a``: the
    unit's post-ReLU output, as the next layer reads it), computed in eval mode with
    ``torch.autograd.grad`` so ``.grad`` fields are untouched. ``norm``: the product of the
    unit's incoming and outgoing weight norms (raw; the search divides by the layer mean).
    ``batches``: an iterable of ``(x, y)`` batches (or a zero-argument callable returning one)."""
    layout = mlp_layout(model)
    if kind == "norm":
        with torch.no_grad():
            return [
                (model.get_submodule(name).weight.norm(dim=1) * _consumer(model, layout, i).weight.norm(dim=0)).cpu()
                for i, name in enumerate(layout.hidden)
            ]
    if kind != "taylor":
        raise ConfigError(f"unknown usefulness {kind!r}; known: {', '.join(USEFULNESS)}")
    batches = batch_pass(batches)
    if batches is None:
        raise ConfigError("the taylor usefulness needs batches of (x, y) training data; or use usefulness='norm'")
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        _consumer(model, layout, i).register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0]))
        for i in range(layout.depth)
    ]
    totals = [torch.zeros(w, dtype=torch.float64) for w in layout.widths]
    count = 0
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for x, y in batches:
                seen.clear()
                loss = loss_fn(model(x), y)
                acts = [seen[i] for i in range(layout.depth)]
                grads = torch.autograd.grad(loss, acts)
                for total, a, g in zip(totals, acts, grads):
                    total += (a.detach() * g).sum(dim=0).abs().double().cpu()
                count += 1
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if count == 0:
        raise ConfigError("the taylor usefulness got an empty iterable of batches; pass at least one (x, y)")
    return [(t / count).float() for t in totals]


# -- the search ---------------------------------------------------------------------------------
class GrowPrune:
    """Runs grow-and-prune events on an MLP (see the module docstring).

    >>> search = GrowPrune(GrowPruneConfig(max_params=100_000), example_input=x[:1])
    >>> for cycle in range(cycles):
    ...     train(model, epochs=1)                       # any loop; rebuild its optimizer
    ...     model, record = search.event(model, batches=loader)  # its first usefulness_batches
    """

    def __init__(
        self,
        config: GrowPruneConfig,
        *,
        example_input: torch.Tensor,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    ) -> None:
        if not isinstance(config, GrowPruneConfig):
            raise ConfigError(f"config must be a GrowPruneConfig, got {type(config).__name__}")
        self.config, self.example, self.loss_fn = config, example_input, loss_fn
        self.generator = torch.Generator().manual_seed(config.seed)
        self.events = 0
        self.history: list[dict] = []

    def check(self, model: nn.Module) -> MLPLayout:
        """The model's layout, or a ConfigError if it is outside the limits already."""
        c = self.config
        layout = mlp_layout(model)
        params = sum(p.numel() for p in model.parameters())
        if params != mlp_parameters(layout.in_features, layout.widths, layout.out_features):
            raise ConfigError(f"{type(model).__name__} has parameters outside its Linear layers; "
                              "grow-and-prune counts only an MLP's weights and biases")
        if params > c.max_params:
            raise ConfigError(
                f"the network (hidden widths {list(layout.widths)}) already has {params} parameters, above "
                f"max_params={c.max_params}; start from narrower layers or raise max_params"
            )
        if layout.depth > c.max_depth:
            raise ConfigError(
                f"the network already has {layout.depth} hidden layers, above max_depth={c.max_depth}; "
                "start shallower or raise max_depth"
            )
        return layout

    def scores(self, model: nn.Module, batches: Optional[Iterable[Batch]] = None) -> list[torch.Tensor]:
        """The usefulness the pruning step ranks by (``norm`` divided by each layer's mean).
        ``batches``: an iterable of ``(x, y)`` batches (or a callable returning one); the
        first ``usefulness_batches`` are read."""
        c = self.config
        if c.usefulness == "taylor":
            batches = batch_pass(batches)
            if batches is None:
                raise ConfigError("usefulness 'taylor' needs batches=(x, y) batches at every event; or use 'norm'")
            batches = (b for _, b in zip(range(c.usefulness_batches), batches))
        raw = unit_usefulness(model, c.usefulness, batches=batches, loss_fn=self.loss_fn)
        if c.usefulness == "norm":
            raw = [s / s.mean().clamp(min=torch.finfo(s.dtype).tiny) for s in raw]
        return raw

    def event(self, model: nn.Module, batches: Optional[Iterable[Batch]] = None) -> tuple[nn.Module, dict]:
        """Prune, maybe deepen, grow; returns ``(new model, record)``; ``model`` is untouched.
        ``batches``: an iterable of ``(x, y)`` batches, e.g. a ``DataLoader`` (a zero-argument
        callable returning one is accepted too); ``taylor`` usefulness reads its first
        ``usefulness_batches``.

        The record holds the widths before and after, units pruned per layer (old layout),
        the deepening decision, units added per layer (new layout), depth and parameters."""
        c = self.config
        layout = self.check(model)
        before = list(layout.widths)
        plan = lowest_units(self.scores(model, batches), c.prune, c.min_width) if c.prune else [[] for _ in before]
        removal = {layout.hidden[i]: units for i, units in enumerate(plan) if units}
        model = remove_units(model, build_graph(model, self.example), removal) if removal else copy.deepcopy(model)

        layout = mlp_layout(model)
        params = mlp_parameters(layout.in_features, layout.widths, layout.out_features)
        site = deepen_site(layout.in_features, layout.widths, layout.out_features, c.depth_ratio)
        if site is None:
            deepen = "not saturated"
        elif layout.depth >= c.max_depth:
            deepen = "at max_depth"
        elif params + layout.widths[site] ** 2 + layout.widths[site] > c.max_params:
            deepen = "over max_params"
        else:
            model = insert_identity_layer(model, site, example_input=self.example, atol=1e-6)
            layout = mlp_layout(model)
            deepen = "inserted"

        added = plan_growth(layout.in_features, layout.widths, layout.out_features, c.add, c.max_params, self.generator)
        for i, n in enumerate(added):
            if n:
                grow = growth_site(model, layout.hidden[i], self.example)
                incoming, _ = new_unit_weights(model, grow, n, "random", scale=c.init_scale, bias=0.0,
                                               generator=self.generator)
                add_units(model, grow, n, incoming=incoming, example_input=self.example)
        layout = mlp_layout(model)
        params = sum(p.numel() for p in model.parameters())
        if params > c.max_params or layout.depth > c.max_depth:  # the plans above rule this out
            raise GrowthError(f"event produced {params} parameters / depth {layout.depth} beyond the limits")
        self.events += 1
        record = {
            "event": self.events, "widths_before": before, "pruned": [len(u) for u in plan],
            "deepen": deepen, "deepened_after": site if deepen == "inserted" else None, "added": added,
            "widths": list(layout.widths), "depth": layout.depth, "params": params,
        }
        self.history.append(record)
        return model, dict(record)

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"format": _FORMAT, "config": dataclasses.asdict(self.config), "events": self.events,
                "history": [dict(r) for r in self.history], "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping) -> None:
        if not isinstance(state, Mapping) or state.get("format") != _FORMAT:
            raise CheckpointError(f"not a GrowPrune state (missing format {_FORMAT})")
        mine = dataclasses.asdict(self.config)
        if state["config"] != mine:
            changed = sorted(k for k in mine if state["config"].get(k) != mine[k])
            raise CheckpointError(f"the saved search used other meta-parameters ({', '.join(changed)}); "
                                  "resume it with the same GrowPruneConfig")
        self.events = int(state["events"])
        self.history = [dict(r) for r in state["history"]]
        self.generator.set_state(state["generator"])
