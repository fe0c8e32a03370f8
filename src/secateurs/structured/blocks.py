"""Structured pruning of transformer blocks: whole attention heads and MLP hidden units.

``torch.fx`` cannot trace Hugging Face transformers (Python control flow, caches, masks built
from shapes), so this path does not trace at all. A transformer's couplings live inside two
kinds of block whose structure is fixed by the architecture, and each is recognised by one
small **block handler** in the :data:`BLOCKS` registry, from the module's children:

* attention: ``q/k/v/o_proj`` (Llama, Mistral, Qwen, ViT, DeiT, Swin and most models in
  ``transformers`` 5), ``self.query/key/value`` + ``output.dense`` (BERT, RoBERTa), and a
  fused ``c_attn`` + ``c_proj`` (GPT-2's ``Conv1D``);
* MLP: ``gate_proj/up_proj/down_proj`` (SwiGLU), ``fc1/fc2``, ``c_fc/c_proj`` and BERT's
  ``intermediate.dense`` / ``output.dense``.

A handler returns a :class:`UnitGroup`: its units (heads, or key/value groups under
grouped-query attention, or hidden units) and, for every layer that carries them, the
:class:`Part` of that layer's outputs or inputs each unit owns. Removing a unit removes its
slices from every part at once, so q/k/v/o (or gate/up/down) stay consistent; positional
code (rotary embeddings) is untouched because the head size never changes, and a head's
per-head parameters (Swin's relative position bias) are sliced with it. A new block type is
one function decorated with ``@BLOCKS.register(name)``.

Never a guess: every layer of a group must be exactly as wide as its units' slices (an MLP
whose ``fc2`` also reads other features, value heads of another size than the query heads
are refused), and a module that looks like attention or an MLP (a class named
``...Attention`` / ``...MLP``, or children named ``q_proj``, ``query``, ``qkv``,
``out_proj``, ``fc1``, ...) that no handler recognises, such as ``nn.MultiheadAttention``,
is refused unless excluded, rather than silently left dense.

Unit importance is the same score vocabulary as elsewhere: ``l1`` (the summed |w| of a unit's
slices) or first-order ``taylor`` (Molchanov et al. 2019: the squared sum of ``g * w`` over the
unit's slices, averaged over batches). Removal rebuilds smaller ``Linear`` / ``Conv1D`` layers
in place: the result is an ordinary dense model of the same class.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..layers import as_rows, layer_type
from ..masks import unwrap_model
from ..outputs import batch_pass, call_model, split_batch, task_loss
from ..registry import Registry
from ..validate import check_number

__all__ = [
    "Part", "UnitGroup", "BLOCKS", "find_unit_groups", "unit_importance", "remove_units_",
    "prune_units", "prune_units_to_macs", "apply_plan", "count_parameters", "save_pretrained_compact",
]


@dataclass(frozen=True)
class Part:
    """Unit ``u`` owns indices ``offset + u * width ... + width - 1`` along the ``side``
    ("out" or "in") of layer ``layer``."""

    layer: str
    side: str
    offset: int
    width: int


@dataclass
class UnitGroup:
    """Units removed together: the heads of one attention module or the hidden units of one
    MLP. ``fixup(module, kept)`` updates the block's own attributes after a removal."""

    name: str
    kind: str
    module: str
    units: int
    unit_size: int
    parts: list[Part]
    fixup: Callable[[nn.Module, list[int]], None] | None = None
    per_unit: list[tuple[str, int]] = field(default_factory=list)  # (parameter name, axis) sliced per unit


BlockHandler = Callable[[str, nn.Module], "UnitGroup | None"]
BLOCKS: Registry[BlockHandler] = Registry("block handler")


def _join(prefix: str, name: str) -> str:
    """The qualified name of ``name`` inside the module called ``prefix`` ("" is the model)."""
    return f"{prefix}.{name}" if prefix else name


def _layer(module: nn.Module, path: str) -> nn.Module | None:
    for attr in path.split("."):
        module = getattr(module, attr, None)
        if module is None:
            return None
    return module if layer_type(module) is not None else None


def _outputs(layer: nn.Module) -> int:
    kind = layer_type(layer)
    return getattr(layer, kind.param).shape[kind.output_axis]


def _axis(layer: nn.Module, side: str) -> int:
    """The weight axis of ``layer``'s outputs (``side="out"``) or inputs (``"in"``)."""
    kind = layer_type(layer)
    return kind.output_axis if side == "out" else 1 - kind.output_axis


def _set_int_attrs(module: nn.Module, values: dict[str, int]) -> None:
    for attr, value in values.items():
        if isinstance(getattr(module, attr, None), int) and not isinstance(getattr(module, attr), bool):
            setattr(module, attr, value)


def _head_dim(name: str, module: nn.Module, q: nn.Module, head_dim) -> int:
    """The head size, from ``head_dim`` or from the query width and a head count attribute; an
    attention-shaped module without either is refused, never skipped."""
    if isinstance(head_dim, int) and not isinstance(head_dim, bool):
        return head_dim
    for attr in ("num_heads", "num_attention_heads", "n_heads"):
        heads = getattr(module, attr, None)
        if isinstance(heads, int) and heads > 0 and _outputs(q) % heads == 0:
            return _outputs(q) // heads
    raise ConfigError(
        f"{name} looks like attention (query / key / value / output projections) but says neither its head "
        "size (head_dim) nor its head count (num_heads / num_attention_heads), so its heads cannot be "
        "located; set one of them, or register a handler for its class with BLOCKS.register"
    )


def _heads(name: str, q: nn.Module, k: nn.Module, head_dim: int) -> tuple[int, int]:
    q_out, k_out = _outputs(q), _outputs(k)
    if head_dim <= 0 or q_out % head_dim or k_out % head_dim:
        raise ConfigError(
            f"{name}: head size {head_dim} does not divide the query ({q_out}) and key ({k_out}) widths, so its "
            "heads cannot be located; check the model's head_dim / num_attention_heads"
        )
    heads, kv = q_out // head_dim, k_out // head_dim
    if heads % kv:
        raise ConfigError(f"{name}: {heads} query heads do not split into {kv} key/value groups")
    return heads, kv


@BLOCKS.register("qkvo_attention", "attention with q_proj / k_proj / v_proj / o_proj (Llama, ViT, Swin, ...)")
def qkvo_attention(name: str, module: nn.Module) -> UnitGroup | None:
    q, k, v, o = (_layer(module, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    if None in (q, k, v, o):
        return None
    head_dim = _head_dim(name, module, q, getattr(module, "head_dim", None))
    heads, kv = _heads(name, q, k, head_dim)
    group = heads // kv  # query heads per key/value head: a unit is one key/value group
    per_unit = []
    bias = getattr(module, "relative_position_bias", None)
    if bias is not None:  # Swin: one bias table column per head
        table = getattr(bias, "relative_position_bias_table", None)
        if not isinstance(table, nn.Parameter) or table.shape[-1] != heads or group != 1:
            raise ConfigError(f"{name}: its relative position bias is not one column per head; heads cannot be removed")
        per_unit.append(("relative_position_bias.relative_position_bias_table", table.dim() - 1))

    def fixup(m: nn.Module, kept: list[int]) -> None:
        _set_int_attrs(m, {"num_heads": len(kept) * group, "num_attention_heads": len(kept) * group,
                           "num_key_value_heads": len(kept)})
        if bias is not None:
            _set_int_attrs(m.relative_position_bias, {"num_heads": len(kept), "num_attention_heads": len(kept)})

    return UnitGroup(
        f"{name}:heads", "heads", name, kv, group * head_dim,
        [Part(_join(name, "q_proj"), "out", 0, group * head_dim), Part(_join(name, "k_proj"), "out", 0, head_dim),
         Part(_join(name, "v_proj"), "out", 0, head_dim), Part(_join(name, "o_proj"), "in", 0, group * head_dim)],
        fixup, per_unit,
    )


@BLOCKS.register("bert_attention", "BERT-style attention: self.query / key / value and output.dense")
def bert_attention(name: str, module: nn.Module) -> UnitGroup | None:
    q, k, v, o = (_layer(module, p) for p in ("self.query", "self.key", "self.value", "output.dense"))
    if None in (q, k, v, o):
        return None
    head_dim = _head_dim(name, module.self, q, getattr(module.self, "attention_head_size", None))
    heads, _ = _heads(name, q, k, head_dim)

    def fixup(m: nn.Module, kept: list[int]) -> None:
        _set_int_attrs(m.self, {"num_attention_heads": len(kept), "all_head_size": len(kept) * head_dim})

    return UnitGroup(
        f"{name}:heads", "heads", name, heads, head_dim,
        [Part(_join(name, "self.query"), "out", 0, head_dim), Part(_join(name, "self.key"), "out", 0, head_dim),
         Part(_join(name, "self.value"), "out", 0, head_dim), Part(_join(name, "output.dense"), "in", 0, head_dim)],
        fixup,
    )


@BLOCKS.register("fused_qkv_attention", "GPT-2-style attention: one c_attn producing q, k, v, and c_proj")
def fused_qkv_attention(name: str, module: nn.Module) -> UnitGroup | None:
    qkv, o = _layer(module, "c_attn"), _layer(module, "c_proj")
    if None in (qkv, o):
        return None
    head_dim, split = getattr(module, "head_dim", None), getattr(module, "split_size", None)
    if not isinstance(head_dim, int) or not isinstance(split, int):
        raise ConfigError(
            f"{name} has c_attn / c_proj like GPT-2's attention but no int head_dim and split_size, so its "
            "heads cannot be located; register a handler for its class with BLOCKS.register"
        )
    if getattr(module, "is_cross_attention", False) or _outputs(qkv) != 3 * split or split % head_dim:
        raise ConfigError(f"{name}: c_attn is not three equal q, k, v blocks of whole heads; its heads cannot be removed")
    heads = split // head_dim

    def fixup(m: nn.Module, kept: list[int]) -> None:
        _set_int_attrs(m, {"split_size": len(kept) * head_dim, "num_heads": len(kept)})

    return UnitGroup(
        f"{name}:heads", "heads", name, heads, head_dim,
        [Part(_join(name, "c_attn"), "out", i * split, head_dim) for i in range(3)]
        + [Part(_join(name, "c_proj"), "in", 0, head_dim)],
        fixup,
    )


def _mlp(name: str, module: nn.Module, producers: Sequence[str], consumer: str) -> UnitGroup | None:
    layers = [_layer(module, p) for p in (*producers, consumer)]
    if None in layers:
        return None
    # every producer's and the consumer's width is checked against the units in find_unit_groups
    return UnitGroup(
        f"{name}:mlp", "mlp", name, _outputs(layers[0]), 1,
        [Part(_join(name, p), "out", 0, 1) for p in producers] + [Part(_join(name, consumer), "in", 0, 1)],
    )


@BLOCKS.register("gated_mlp", "SwiGLU MLP: gate_proj, up_proj -> down_proj (Llama, Mistral, Qwen)")
def gated_mlp(name: str, module: nn.Module) -> UnitGroup | None:
    return _mlp(name, module, ("gate_proj", "up_proj"), "down_proj")


@BLOCKS.register("fc_mlp", "MLP fc1 -> fc2 (ViT, DeiT, Swin, ...)")
def fc_mlp(name: str, module: nn.Module) -> UnitGroup | None:
    return _mlp(name, module, ("fc1",), "fc2")


@BLOCKS.register("conv1d_mlp", "GPT-2 MLP: c_fc -> c_proj")
def conv1d_mlp(name: str, module: nn.Module) -> UnitGroup | None:
    return _mlp(name, module, ("c_fc",), "c_proj")


@BLOCKS.register("bert_mlp", "BERT layer MLP: intermediate.dense -> output.dense")
def bert_mlp(name: str, module: nn.Module) -> UnitGroup | None:
    if _layer(module, "attention") is not None or getattr(module, "attention", None) is None:
        return None
    return _mlp(name, module, ("intermediate.dense",), "output.dense")


#: children (registered layers) whose names mark a module as attention or as an MLP
_ATTENTION_CHILDREN = {"q", "k", "v", "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "qkv",
                       "out_proj", "c_attn"}
_MLP_CHILDREN = {"fc1", "fc2", "gate_proj", "up_proj", "down_proj", "c_fc"}


def _looks_like(module: nn.Module) -> set[str]:
    """The unit kinds ``module`` looks like it holds: "heads" for a class named ...Attention
    or registered-layer children named like projections (q_proj, query, qkv, out_proj, ...),
    "mlp" for ...MLP or fc1 / fc2 / gate_proj / up_proj / down_proj / c_fc children. A module
    without any matrix parameter (a functional attention) holds no units."""
    cls = type(module).__name__.lower()
    children = {n for n, c in module.named_children() if layer_type(c) is not None}
    kinds = set()
    if cls.endswith("attention") or children & _ATTENTION_CHILDREN:
        kinds.add("heads")
    if cls.endswith("mlp") or children & _MLP_CHILDREN:
        kinds.add("mlp")
    if kinds and not any(p.dim() >= 2 for p in module.parameters()):
        return set()
    return kinds


def _nested(a: str, b: str) -> bool:
    """Whether module ``a`` is ``b``, inside it, or contains it."""
    return a == b or a == "" or b == "" or a.startswith(b + ".") or b.startswith(a + ".")


def _check_group(modules: dict[str, nn.Module], group: UnitGroup) -> None:
    """Refuse a group whose layers are not exactly its units' slices: every (layer, side) must
    be as wide as its parts say (``offset + units * width``; three such blocks for GPT-2's fused
    ``c_attn``), else removing a unit would cut some other unit's or input's columns."""
    spans: dict[tuple[str, str], list[Part]] = {}
    for p in group.parts:
        layer = modules.get(p.layer)
        if layer is None or layer_type(layer) is None:
            raise ConfigError(f"{group.name}: part {p.layer!r} is not a registered layer of this model")
        if p.side not in ("out", "in"):
            raise ConfigError(f"{group.name}: part {p.layer!r} has side {p.side!r}; it must be 'out' or 'in'")
        spans.setdefault((p.layer, p.side), []).append(p)
    for (name, side), parts in spans.items():
        layer = modules[name]
        w = getattr(layer, layer_type(layer).param)
        if w.dim() != 2:
            raise ConfigError(
                f"{group.name}: unit groups need matrix weights; {name} ({type(layer).__name__}) has {w.dim()} dims; "
                f"exclude it (exclude=[{group.name!r}])"
            )
        size = w.shape[_axis(layer, side)]
        expected = sum(group.units * p.width for p in parts)
        if size != expected or max(p.offset + group.units * p.width for p in parts) != size:
            what = "outputs" if side == "out" else "inputs"
            raise ConfigError(
                f"{group.name}: {name} has {size} {what} but the block's {group.units} {group.kind} units take "
                f"{expected} of them ({' + '.join(f'{group.units} x {p.width}' for p in parts)}), so removing a unit "
                f"would cut the wrong slices (e.g. a consumer that also reads other features, or value heads of "
                f"another size); exclude it (exclude=[{group.name!r}]) or register a handler for "
                f"{type(modules[group.module]).__name__} with @secateurs.structured.blocks.BLOCKS.register(name)"
            )


def find_unit_groups(model: nn.Module, exclude: Sequence[str] = (), kinds: Iterable[str] = ("heads", "mlp")) -> list[UnitGroup]:
    """Every attention-head and MLP-unit group the registered handlers recognise, in module
    order; ``exclude`` holds glob patterns on group names (``"*.layers.0.*"``).

    Refused (ConfigError): a group whose layers' widths are not its units' slices, and a
    module of a requested kind that no handler recognises (a class named ...Attention / ...MLP,
    or one with children named like projections), unless excluded: it would stay dense."""
    model = unwrap_model(model)
    kinds = set(kinds)
    modules = dict(model.named_modules())
    groups, recognised = [], set()
    matched: dict[str, set[str]] = {}
    for name, module in modules.items():
        for entry in BLOCKS:
            group = entry.obj(name, module)
            if group is None or group.kind in matched.get(name, ()):
                continue  # one group per kind and module: the first handler that recognises it
            matched.setdefault(name, set()).add(group.kind)
            recognised.add(group.kind)
            if group.kind in kinds and not any(fnmatch.fnmatchcase(group.name, p) for p in exclude):
                _check_group(modules, group)
                groups.append(group)
    missing = sorted(kinds - recognised)
    if missing:
        what = {"heads": "attention", "mlp": "MLP"}
        raise ConfigError(
            f"no {' or '.join(what[k] for k in missing)} block of {type(model).__name__} is recognised, so its "
            f"{' and '.join(missing)} cannot be pruned (handlers: {', '.join(BLOCKS.names())}); register one for "
            "its block type with @secateurs.structured.blocks.BLOCKS.register(name), or leave that kind out"
        )
    unmatched = [
        (name, kind)
        for name, module in modules.items()
        for kind in sorted(_looks_like(module) & kinds)
        if not any(kind in ks and _nested(name, other) for other, ks in matched.items())
        and not any(fnmatch.fnmatchcase(f"{name}:{kind}", p) for p in exclude)
    ]
    if unmatched:
        what = {"heads": "attention", "mlp": "MLP"}
        listed = ", ".join(f"{name or '(the model)'} ({type(modules[name]).__name__}, {what[kind]})"
                           for name, kind in unmatched[:5])
        more = f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else ""
        raise ConfigError(
            f"{listed}{more} look like attention or MLP blocks but no block handler recognises them, so their units "
            f"would silently stay dense (handlers: {', '.join(BLOCKS.names())}); exclude them "
            f"(exclude={[f'{n}:{k}' for n, k in unmatched[:5]]}), leave that kind out, or register a handler for "
            "their class with @secateurs.structured.blocks.BLOCKS.register(name)"
        )
    return groups


def _indices(part: Part, units: Iterable[int]) -> torch.Tensor:
    return torch.cat([torch.arange(part.offset + u * part.width, part.offset + (u + 1) * part.width) for u in units])


def unit_importance(
    model: nn.Module,
    groups: Sequence[UnitGroup],
    importance: str = "l1",
    batches: Iterable | None = None,
    loss_fn: Callable | None = None,
) -> dict[str, torch.Tensor]:
    """One score per unit of every group (higher = keep): ``"l1"`` sums |w| over the unit's
    slices; ``"taylor"`` is (Σ g·w over the slices)² averaged over ``batches`` (first-order
    Taylor, Molchanov et al. 2019; inputs, outputs and loss as in :mod:`secateurs.outputs`)."""
    model = unwrap_model(model)
    modules = dict(model.named_modules())
    if importance == "l1":
        scores = {}
        for g in groups:
            s = torch.zeros(g.units, dtype=torch.float64)
            for p in g.parts:
                layer = modules[p.layer]
                w = getattr(layer, layer_type(layer).param)
                per_index = as_rows(w.detach().abs().double(), _axis(layer, p.side)).sum(1)
                s += per_index[p.offset:p.offset + g.units * p.width].reshape(g.units, p.width).sum(1)
            scores[g.name] = s
        return scores
    if importance != "taylor":
        raise ConfigError(f"unknown unit importance {importance!r}; known: l1, taylor")
    batches = batch_pass(batches)
    if batches is None:
        raise ConfigError("taylor unit importance needs batches=[(inputs, targets), ...] (or Hugging Face batch dicts)")
    layers = sorted({p.layer for g in groups for p in g.parts})
    weights = [getattr(modules[n], layer_type(modules[n]).param) for n in layers]
    sums = {g.name: torch.zeros(g.units, dtype=torch.float64) for g in groups}
    n = 0
    for batch in batches:
        x, y = split_batch(batch)
        loss = task_loss(model, call_model(model, x), y, x, loss_fn)
        grads = dict(zip(layers, torch.autograd.grad(loss, weights, allow_unused=True)))
        for g in groups:
            c = torch.zeros(g.units, dtype=torch.float64)
            for p in g.parts:
                layer = modules[p.layer]
                grad = grads[p.layer]
                if grad is None:
                    continue
                gw = (grad * getattr(layer, layer_type(layer).param)).detach().double()
                per_index = as_rows(gw, _axis(layer, p.side)).sum(1)
                c += per_index[p.offset:p.offset + g.units * p.width].reshape(g.units, p.width).sum(1)
            sums[g.name] += c**2
        n += 1
    if n == 0:
        raise ConfigError("taylor unit importance needs at least one batch; the iterable was empty")
    return {k: v / n for k, v in sums.items()}


def _slice_layer_(layer: nn.Module, side: str, keep: torch.Tensor) -> None:
    kind = layer_type(layer)
    w = getattr(layer, kind.param)
    axis = _axis(layer, side)
    with torch.no_grad():
        new_w = nn.Parameter(w.index_select(axis, keep.to(w.device)).clone(), requires_grad=w.requires_grad)
        setattr(layer, kind.param, new_w)
        bias = getattr(layer, "bias", None)
        if side == "out" and isinstance(bias, nn.Parameter):
            layer.bias = nn.Parameter(bias.index_select(0, keep.to(bias.device)).clone(), requires_grad=bias.requires_grad)
    n_out, n_in = new_w.shape[kind.output_axis], new_w.shape[1 - kind.output_axis]
    _set_int_attrs(layer, {"out_features": n_out, "in_features": n_in, "nf": n_out, "nx": n_in})


def remove_units_(model: nn.Module, group: UnitGroup, keep: Sequence[int]) -> None:
    """Remove every unit of ``group`` not in ``keep`` from all its parts, in place."""
    model = unwrap_model(model)
    keep = sorted({int(u) for u in keep})
    if not keep or keep[0] < 0 or keep[-1] >= group.units:
        raise ConfigError(f"{group.name}: keep must list between 1 and {group.units} unit indices, got {keep}")
    modules = dict(model.named_modules())
    _check_group(modules, group)  # before any layer is cut
    drop = [u for u in range(group.units) if u not in keep]
    if not drop:
        return
    by_side: dict[tuple[str, str], list[torch.Tensor]] = {}
    for p in group.parts:
        by_side.setdefault((p.layer, p.side), []).append(_indices(p, drop))
    for (layer_name, side), removed in by_side.items():
        layer = modules[layer_name]
        size = getattr(layer, layer_type(layer).param).shape[_axis(layer, side)]
        mask = torch.ones(size, dtype=torch.bool)
        mask[torch.cat(removed)] = False
        _slice_layer_(layer, side, torch.nonzero(mask).reshape(-1))
    block = modules[group.module]
    for param_name, axis in group.per_unit:
        owner_name, _, attr = param_name.rpartition(".")
        owner = block.get_submodule(owner_name) if owner_name else block
        p = getattr(owner, attr)
        with torch.no_grad():
            setattr(owner, attr, nn.Parameter(p.index_select(axis, torch.tensor(keep, device=p.device)).clone()))
    if group.fixup is not None:
        group.fixup(block, keep)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in unwrap_model(model).parameters())


def prune_units(
    model: nn.Module,
    amount: float | dict[str, float],
    importance: str = "l1",
    batches: Iterable | None = None,
    loss_fn: Callable | None = None,
    exclude: Sequence[str] = (),
) -> dict[str, list[int]]:
    """Remove the ``amount`` fraction of least important units of every group (per kind:
    ``{"heads": 0.25, "mlp": 0.5}``), at least one unit kept per group; returns the kept
    unit indices by group name (a plan :func:`apply_plan` replays on a fresh model)."""
    fractions = amount if isinstance(amount, dict) else {"heads": amount, "mlp": amount}
    for kind, f in fractions.items():
        if kind not in ("heads", "mlp"):
            raise ConfigError(f"unknown unit kind {kind!r}; known: heads, mlp")
        check_number(f, f"the fraction of {kind} to remove", minimum=0, below=1)
    groups = find_unit_groups(model, exclude, kinds=[k for k, f in fractions.items() if f > 0])
    scores = unit_importance(model, groups, importance, batches, loss_fn)
    plan = _plan(groups, scores, fractions)
    apply_plan(model, plan, groups)
    return plan


def _plan(groups: Sequence[UnitGroup], scores: dict[str, torch.Tensor], fractions: dict[str, float]) -> dict[str, list[int]]:
    """Keep the highest-scoring units of each group (ties to the lower index), at least one."""
    plan = {}
    for g in groups:
        n_keep = max(1, g.units - round(fractions.get(g.kind, 0.0) * g.units))
        order = torch.sort(scores[g.name], descending=True, stable=True).indices[:n_keep]
        plan[g.name] = sorted(order.tolist())
    return plan


def prune_units_to_macs(
    model: nn.Module,
    example_input,
    macs_fraction_removed: float,
    importance: str = "l1",
    batches: Iterable | None = None,
    loss_fn: Callable | None = None,
    exclude: Sequence[str] = (),
    tolerance: float = 0.01,
    max_steps: int = 14,
) -> tuple[nn.Module, float]:
    """A pruned copy of ``model`` with ``macs_fraction_removed`` of its MACs gone (measured by
    :func:`secateurs.analysis.flops.layer_macs` on ``example_input``), removing the same share
    of heads and MLP units in every block, the least important first. Bisects that share;
    returns ``(pruned copy, share)``. The scores are computed once, on the dense model."""
    import copy

    from ..analysis.flops import layer_macs
    from .prune import bisect_removal

    check_number(macs_fraction_removed, "macs_fraction_removed", minimum=0.0, below=1.0, numpy=True)
    groups = find_unit_groups(model, exclude)
    scores = unit_importance(model, groups, importance, batches, loss_fn)
    dense = sum(layer_macs(model, example_input).values())

    def attempt(share: float) -> tuple[nn.Module, float]:
        pruned = copy.deepcopy(model)
        apply_plan(pruned, _plan(groups, scores, {"heads": share, "mlp": share}))
        return pruned, 1.0 - sum(layer_macs(pruned, example_input).values()) / dense

    _, top = attempt(0.999)
    if top + tolerance < macs_fraction_removed:
        raise ConfigError(
            f"removing heads and MLP units can take at most {top:.1%} of this model's MACs (embeddings, "
            f"output heads and other layers keep theirs); asked for {macs_fraction_removed:.1%}"
        )
    return bisect_removal(attempt, macs_fraction_removed, 0.999, tolerance, max_steps, model)


def apply_plan(model: nn.Module, plan: dict[str, list[int]], groups: Sequence[UnitGroup] | None = None) -> None:
    """Remove units as ``plan`` (group name -> kept unit indices) says."""
    groups = {g.name: g for g in (groups or find_unit_groups(model))}
    unknown = [k for k in plan if k not in groups]
    if unknown:
        raise ConfigError(f"the plan names unit groups this model does not have: {unknown[:3]}")
    for name, keep in plan.items():
        remove_units_(model, groups[name], keep)


def save_pretrained_compact(model: nn.Module, directory: str) -> dict[str, int]:
    """``model.save_pretrained(directory)`` with its config rewritten to the pruned sizes, so
    that ``from_pretrained(directory)`` rebuilds the compact model without secateurs.

    A Hugging Face config holds one head count and one MLP width for all layers, and most
    models derive the head size from ``hidden_size / num_attention_heads``. So this works when
    every layer kept the same number of heads and MLP units and the model reads an explicit
    ``head_dim`` from its config (Llama, Mistral, Qwen, ViT, DeiT in ``transformers`` 5). It
    is checked, not assumed: a fresh model is built from the new config and every parameter
    shape must equal the pruned model's; otherwise a ConfigError names the first mismatch (use
    :func:`secateurs.structured.save_compact`, a ``torch.export`` archive, for those models).
    Returns the config fields it changed.
    """
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "save_pretrained"):
        raise ConfigError(f"{type(model).__name__} is not a Hugging Face model (no config / save_pretrained)")
    groups = find_unit_groups(model)
    changes: dict[str, int] = {}
    for kind in ("heads", "mlp"):
        sizes = {(g.units, g.unit_size) for g in groups if g.kind == kind}
        if len(sizes) > 1:
            raise ConfigError(
                f"layers kept different numbers of {kind} ({sorted(sizes)}); a Hugging Face config holds one "
                "count for all layers: prune uniformly, or save with secateurs.structured.save_compact"
            )
        if not sizes:
            continue
        units, unit_size = sizes.pop()
        if kind == "heads":
            head_dim = getattr(config, "head_dim", None) or unit_size
            group = unit_size // head_dim
            changes["num_attention_heads"] = units * group
            if getattr(config, "num_key_value_heads", None) is not None:
                changes["num_key_value_heads"] = units
            changes["head_dim"] = head_dim
        else:
            for field_name in ("intermediate_size", "n_inner", "mlp_dim"):
                if getattr(config, field_name, None) is not None:
                    changes[field_name] = units
                    break
    new_config = config.__class__.from_dict({**config.to_dict(), **changes})
    with torch.device("meta"):
        fresh = type(model)(new_config)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    for n, p in fresh.state_dict().items():
        if n in shapes and tuple(p.shape) != shapes[n]:
            raise ConfigError(
                f"{type(model).__name__}'s config cannot express the pruned sizes ({n}: a model built from the "
                f"rewritten config has {tuple(p.shape)}, the pruned model {shapes[n]}); save it with "
                "secateurs.structured.save_compact (a torch.export archive) instead"
            )
    old = {k: getattr(config, k, None) for k in changes}
    try:
        for k, v in changes.items():
            setattr(config, k, v)
        model.save_pretrained(directory)
    except BaseException:
        for k, v in old.items():
            setattr(config, k, v)
        raise
    return changes
