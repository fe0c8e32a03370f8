"""Physical removal: rebuild Conv / Linear / BatchNorm layers with only the kept channels.

The result is an ordinary dense model (a deep copy; the original is untouched): smaller
layers of the same types with sliced weights, biases and running statistics, so it is
faster on any backend without sparse kernels (Li et al., 2017; He et al., 2017).
Constant channel pads (ResNet option-A shortcuts, He et al., 2016) shrink with the
channels they are added to; the module that pads is replaced by its fx ``GraphModule``
with the new pad amounts, the only place where the original Python code cannot stay.
"""
from __future__ import annotations

import copy
from typing import Iterable, Mapping, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .graph import DependencyGraph, PadSite

__all__ = ["remove_units", "validate_removal"]

Owner = Optional[tuple[str, int]]


def validate_removal(graph: DependencyGraph, removed: Mapping[str, Iterable[int]]) -> dict[str, set[int]]:
    """Check group names and unit indices; never empty a group (it would cut the network)."""
    checked: dict[str, set[int]] = {}
    for name, units in removed.items():
        group = graph.group(name)
        units = {int(u) for u in units}
        if not units:
            continue
        if group.frozen is not None:
            raise ConfigError(f"group {name!r} cannot be pruned: {group.frozen}")
        bad = sorted(u for u in units if not 0 <= u < group.units)
        if bad:
            raise ConfigError(f"group {name!r} has units 0..{group.units - 1}, got {bad}")
        if len(units) >= group.units:
            raise ConfigError(
                f"removing all {group.units} channels of group {name!r} would disconnect the "
                f"network; keep at least one (remove at most {group.units - 1})"
            )
        for s in group.slices:
            if all(not ix or u in units for u, ix in enumerate(s.indices)):
                raise ConfigError(
                    f"removing units {sorted(units)} of group {name!r} would leave {s.module!r} "
                    f"with no {'input' if s.role == 'in' else 'output'} channels; keep at least one"
                )
        checked[name] = units
    return checked


def _kept(entries: Sequence[Owner], removed: Mapping[str, set[int]]) -> Optional[list[int]]:
    keep = [i for i, e in enumerate(entries) if e is None or e[1] not in removed.get(e[0], ())]
    return None if len(keep) == len(entries) else keep


def _param(source: torch.Tensor, index: Sequence[tuple[int, list[int]]]) -> nn.Parameter:
    return nn.Parameter(_take(source, index), requires_grad=source.requires_grad)


def _take(source: torch.Tensor, index: Sequence[tuple[int, list[int]]]) -> torch.Tensor:
    out = source.detach()
    for dim, keep in index:
        out = out.index_select(dim, torch.as_tensor(keep, dtype=torch.long, device=out.device))
    return out.clone()


def _copy_without_tensors(m: nn.Module) -> nn.Module:
    """A copy of a leaf module whose parameters and buffers are replaced right after."""
    memo = {id(t): None for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))}
    return copy.deepcopy(m, memo)


def _shrink_conv(m: nn.Module, cuts: Mapping[str, list[int]]) -> nn.Module:
    depthwise = "depthwise" in cuts
    out_keep = cuts.get("out", cuts.get("depthwise"))
    in_keep = cuts.get("in")
    w_index = [(0, out_keep)] if out_keep is not None else []
    if in_keep is not None:
        w_index.append((1, in_keep))
    weight = _take(m.weight, w_index)
    groups = weight.shape[0] if depthwise else m.groups
    if type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        new = type(m)(
            weight.shape[1] * groups, weight.shape[0], m.kernel_size, stride=m.stride,
            padding=m.padding, dilation=m.dilation, groups=groups, bias=m.bias is not None,
            padding_mode=m.padding_mode, device="meta", dtype=weight.dtype,
        )
    else:  # a subclass with its own constructor (e.g. a model's depthwise conv): copy, then resize
        new = _copy_without_tensors(m)
        new.in_channels, new.out_channels, new.groups = weight.shape[1] * groups, weight.shape[0], groups
    new.weight = nn.Parameter(weight, requires_grad=m.weight.requires_grad)
    if m.bias is not None:
        new.bias = _param(m.bias, [(0, out_keep)] if out_keep is not None else [])
    return new


def _shrink_linear(m: nn.Linear, cuts: Mapping[str, list[int]]) -> nn.Module:
    out_keep, in_keep = cuts.get("out"), cuts.get("in")
    w_index = ([(0, out_keep)] if out_keep is not None else []) + ([(1, in_keep)] if in_keep is not None else [])
    weight = _take(m.weight, w_index)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=m.bias is not None, device="meta", dtype=weight.dtype)
    new.weight = nn.Parameter(weight, requires_grad=m.weight.requires_grad)
    if m.bias is not None:
        new.bias = _param(m.bias, [(0, out_keep)] if out_keep is not None else [])
    return new


def _shrink_bn(m: nn.Module, cuts: Mapping[str, list[int]]) -> nn.Module:
    keep = cuts["bn"]
    new = type(m)(
        len(keep), eps=m.eps, momentum=m.momentum, affine=m.affine,
        track_running_stats=m.track_running_stats, device="meta",
    )
    if m.affine:
        new.weight = _param(m.weight, [(0, keep)])
        new.bias = _param(m.bias, [(0, keep)])
    if m.track_running_stats:
        new.running_mean = _take(m.running_mean, [(0, keep)])
        new.running_var = _take(m.running_var, [(0, keep)])
        new.num_batches_tracked = m.num_batches_tracked.detach().clone()
    return new


def _shrink_ln(m: nn.Module, cuts: Mapping[str, list[int]]) -> nn.Module:
    keep = cuts["ln"]
    new = _copy_without_tensors(m)
    new.normalized_shape = (len(keep),)
    new.weight = _param(m.weight, [(0, keep)])
    if m.bias is not None:
        new.bias = _param(m.bias, [(0, keep)])
    return new


def _shrink_params_(m: nn.Module, cuts: Mapping[str, list[int]]) -> nn.Module:
    """Slice a module's own per-channel parameters (roles ``param:<attr>:<dim>``) in place."""
    for role, keep in cuts.items():
        _, attr, dim = role.split(":")
        if attr in m._buffers:  # a buffer stays a buffer
            m._buffers[attr] = _take(m._buffers[attr], [(int(dim), keep)])
        else:
            setattr(m, attr, _param(getattr(m, attr), [(int(dim), keep)]))
    return m


def _shrink(m: nn.Module, cuts: Mapping[str, list[int]]) -> nn.Module:
    own = {r: k for r, k in cuts.items() if r.startswith("param:")}
    if own:
        _shrink_params_(m, own)
        cuts = {r: k for r, k in cuts.items() if r not in own}
        if not cuts:
            return m
    if isinstance(m, nn.LayerNorm) and set(cuts) == {"ln"}:
        new = _shrink_ln(m, cuts)
    elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        new = _shrink_conv(m, cuts)
    elif isinstance(m, nn.Linear):
        new = _shrink_linear(m, cuts)
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        new = _shrink_bn(m, cuts)
    else:  # the graph only records slices of these types
        raise ConfigError(f"cannot shrink a {type(m).__name__}; exclude it")
    return new.train(m.training)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _count_kept(entries: Sequence[Owner], removed: Mapping[str, set[int]]) -> int:
    return sum(1 for e in entries if e is None or e[1] not in removed.get(e[0], ()))


def _new_pad(site: PadSite, pad: Sequence[int], removed: Mapping[str, set[int]]) -> tuple[int, ...]:
    new = list(pad)
    new[site.position] = _count_kept(site.before, removed)
    new[site.position + 1] = _count_kept(site.after, removed)
    return tuple(new)


def _unchanged(site: PadSite, removed: Mapping[str, set[int]]) -> bool:
    return (_count_kept(site.before, removed), _count_kept(site.after, removed)) == (
        len(site.before), len(site.after))


def _rewrite_pads(model: nn.Module, graph: DependencyGraph, removed: Mapping[str, set[int]]) -> nn.Module:
    """Swap each module that pads channels for its GraphModule with the new pad amounts."""
    owners: dict[str, list[PadSite]] = {}
    for site in graph.pads:
        owners.setdefault(site.owner, []).append(site)
    for owner, sites in owners.items():
        if all(_unchanged(s, removed) for s in sites):
            continue
        module = model.get_submodule(owner) if owner else model
        gm = fx.symbolic_trace(module)
        pads = [
            n for n in gm.graph.nodes
            if n.op == "call_function" and n.target is F.pad and not n.meta.get("nn_module_stack")
        ]
        if len(pads) != len(sites):
            raise ConfigError(
                f"module {owner or type(model).__name__!r} pads channels {len(sites)} times in the "
                f"whole model but {len(pads)} times on its own (is it called twice?); exclude it"
            )
        for node, site in zip(pads, sites):
            old = node.args[1] if len(node.args) > 1 else node.kwargs["pad"]
            new = _new_pad(site, old, removed)
            if len(node.args) > 1:
                node.args = (node.args[0], new, *node.args[2:])
            else:
                node.kwargs = {**node.kwargs, "pad": new}
        gm.recompile()
        if not owner:
            return gm
        _set_submodule(model, owner, gm)
    return model


def remove_units(model: nn.Module, graph: DependencyGraph, removed: Mapping[str, Iterable[int]]) -> nn.Module:
    """A smaller deep copy of ``model`` without the given units (``{group: unit indices}``).

    ``graph`` must come from ``build_graph`` on this very model (same module names/shapes).
    """
    cuts_by_group = validate_removal(graph, removed)
    new = copy.deepcopy(model)
    if not cuts_by_group:
        return new
    cuts: dict[str, dict[str, list[int]]] = {}
    for (module, role), entries in graph.owners.items():
        keep = _kept(entries, cuts_by_group)
        if keep is not None:
            cuts.setdefault(module, {})[role] = keep
    for name, module_cuts in cuts.items():
        _set_submodule(new, name, _shrink(new.get_submodule(name), module_cuts))
    return _rewrite_pads(new, graph, cuts_by_group)
