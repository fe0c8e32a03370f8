"""Widening a layer: append units (neurons / filters) to it and to the layer that reads it.

Growth must not change what the network computes (Evci et al., 2022): every new unit either
has zero outgoing weights (its output is ignored), or zero incoming weights, so that it
outputs a constant, which the next layer's bias absorbs. The second case is GradMax's: the
new units start in the linear part of the activation (``bias > 0`` for a ReLU), so their
incoming weights get gradients at once -- with a zero bias PyTorch's ReLU has zero gradient
at 0 and the units would stay dead. After growing, the output on ``example_input`` is
compared with the output before and any change is an error.

The coupled tensors are found with the structured-pruning dependency graph: the layer's
output rows, any BatchNorm on its channels, and the input columns of its consumer (one
column per unit, or ``H*W`` after a flatten). Parameters are replaced by larger ones; the
optimizer's ``param_groups`` point to them and its per-parameter state (momentum, Adam
moments) is zero-padded for the new entries, so training continues as if they had always
been there with no history.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn as nn

from ..errors import ConfigError, GrowthError
from ..structured.graph import build_graph
from ..validate import check_int

__all__ = ["GrowthSite", "growth_site", "add_units", "replace_parameter", "unit_norms"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class GrowthSite:
    """Where units of ``layer`` live: its fan-in, its BatchNorms, and its one consumer.

    ``positions``: consumer input columns per unit (``H*W`` when a conv feeds a linear layer
    through a flatten, else 1). ``fan_out``: outgoing weights per unit (consumer outputs
    times positions, or times the consumer's kernel size)."""

    layer: str
    units: int
    fan_in: int
    consumer: str
    positions: int
    fan_out: int
    norms: tuple[str, ...] = ()


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"{type(model).__name__} has no module {name!r}") from None


def growth_site(model: nn.Module, layer: str, example_input: torch.Tensor) -> GrowthSite:
    """Check that ``layer`` can grow and describe the tensors that grow with it."""
    module = _module(model, layer)
    if not isinstance(module, (nn.Linear, *_CONV)):
        raise ConfigError(f"{layer!r} is a {type(module).__name__}; only Linear and Conv layers can grow")
    if isinstance(module, _CONV) and module.groups != 1:
        raise ConfigError(f"{layer!r} is a grouped conv (groups={module.groups}); growing it is not supported")
    graph = build_graph(model, example_input)
    group = next((g for g in graph.groups if g.producers == (layer,)), None)
    if group is None:
        raise ConfigError(
            f"{layer!r} shares its output channels with other layers (a residual sum or a concat); "
            "only a layer that alone produces its channels can grow"
        )
    if group.frozen is not None:
        raise ConfigError(f"{layer!r} cannot grow: {group.frozen}")
    consumers = [s for s in group.slices if s.role == "in"]
    norms = tuple(s.module for s in group.slices if s.role == "bn")
    if any(s.role == "depthwise" for s in group.slices) or len(consumers) != 1:
        raise ConfigError(
            f"{layer!r} feeds {len(consumers)} layers{' and a depthwise conv' if any(s.role == 'depthwise' for s in group.slices) else ''}; "
            "growing is supported when exactly one Linear or Conv layer reads its output"
        )
    consumer = consumers[0]
    reader = _module(model, consumer.module)
    if isinstance(reader, _CONV) and reader.groups != 1:
        raise ConfigError(f"{consumer.module!r} is a grouped conv; it cannot take new input channels")
    positions = len(consumer.indices[0])
    width = reader.weight.shape[1] * (reader.groups if isinstance(reader, _CONV) else 1)
    base = width - group.units * positions
    if any(ix != tuple(range(base + u * positions, base + (u + 1) * positions)) for u, ix in enumerate(consumer.indices)):
        raise ConfigError(
            f"{consumer.module!r} does not read the channels of {layer!r} as the last block of its input "
            "(they are interleaved or followed by others); growing them is not supported"
        )
    kernel = reader.weight[0, 0].numel() if isinstance(reader, _CONV) else 1
    return GrowthSite(
        layer=layer, units=group.units, fan_in=module.weight[0].numel(), consumer=consumer.module,
        positions=positions, fan_out=reader.weight.shape[0] * positions * kernel, norms=norms,
    )


def replace_parameter(
    module: nn.Module, name: str, value: torch.Tensor, optimizer: Optional[torch.optim.Optimizer], dim: int
) -> nn.Parameter:
    """Swap ``module.<name>`` for ``value`` (which extends it along ``dim``) everywhere the
    optimizer knows it; per-parameter state of the old shape is zero-padded."""
    old = getattr(module, name)
    new = nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad)
    setattr(module, name, new)
    if optimizer is None:
        return new
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state is not None:
        optimizer.state[new] = {k: _pad(v, old.shape, new, dim) for k, v in state.items()}
    return new


def _pad(value, shape: torch.Size, like: torch.Tensor, dim: int):
    if not torch.is_tensor(value) or value.shape != shape:
        return value  # step counters and other scalars carry over
    out = torch.zeros(like.shape, dtype=value.dtype, device=value.device)
    out.narrow(dim, 0, shape[dim]).copy_(value)
    return out


def unit_norms(model: nn.Module, site: GrowthSite) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 norms of every existing unit's incoming and outgoing weight vectors (the scale new
    units are drawn at: ``scale`` times their mean, GradMax's ``mean_norm``)."""
    producer, reader = _module(model, site.layer), _module(model, site.consumer)
    incoming = producer.weight.detach().flatten(1).norm(dim=1)
    w = reader.weight.detach()
    start = w.shape[1] - site.units * (1 if isinstance(reader, _CONV) else site.positions)
    block = w[:, start:]
    if isinstance(reader, _CONV):
        outgoing = block.transpose(0, 1).flatten(1).norm(dim=1)
    else:
        outgoing = block.reshape(w.shape[0], site.units, site.positions).transpose(0, 1).flatten(1).norm(dim=1)
    return incoming, outgoing


def _consumer_input(model: nn.Module, consumer: nn.Module, example: torch.Tensor) -> torch.Tensor:
    """What ``consumer`` reads (eval mode; a temporary hook, outside any training step)."""
    seen: list[torch.Tensor] = []
    handle = consumer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        _output(model, example)
    finally:
        handle.remove()
    return seen[0]


def _constants(x: torch.Tensor, site: GrowthSite, n: int, conv: bool) -> torch.Tensor:
    """The constant each new unit feeds its consumer (per channel, or per input column of a
    linear consumer), or an error if it varies with the input."""
    new = x[:, -n:].flatten(2) if conv else x[:, -n * site.positions:]
    first = new[:1, :, :1] if conv else new[:1]
    if not torch.equal(new, first.expand_as(new)):
        raise ConfigError(
            f"new units of {site.layer!r} with outgoing weights must output a constant (zero incoming "
            "weights), which the next layer's bias absorbs; these vary with the input. Give them zero "
            "outgoing weights instead (random growth)"
        )
    return first.flatten()


def _grow_norm(module: nn.Module, n: int, optimizer) -> None:
    if not isinstance(module, _BN):
        raise ConfigError(f"{type(module).__name__} between a growing layer and its consumer is not supported")
    if module.affine:
        replace_parameter(module, "weight", torch.cat([module.weight, module.weight.new_ones(n)]), optimizer, 0)
        replace_parameter(module, "bias", torch.cat([module.bias, module.bias.new_zeros(n)]), optimizer, 0)
    if module.track_running_stats:
        module.running_mean = torch.cat([module.running_mean, module.running_mean.new_zeros(n)])
        module.running_var = torch.cat([module.running_var, module.running_var.new_ones(n)])
    module.num_features += n


@torch.no_grad()
def add_units(
    model: nn.Module,
    site: GrowthSite,
    n: int,
    *,
    incoming: Optional[torch.Tensor] = None,
    outgoing: Optional[torch.Tensor] = None,
    bias: float = 0.0,
    optimizer: Optional[torch.optim.Optimizer] = None,
    example_input: Optional[torch.Tensor] = None,
    atol: float = 1e-5,
) -> GrowthSite:
    """Append ``n`` units to ``site.layer``; returns the grown site.

    ``incoming``: ``(n, site.fan_in)`` (zeros if None); ``outgoing``: ``(n, site.fan_out)``
    (zeros if None); ``bias``: the new units' bias. Units with non-zero outgoing weights need
    zero incoming weights (they output a constant, absorbed by the consumer's bias: the
    consumer must have a bias, no BatchNorm may sit between, and a conv consumer must not
    pad) and ``example_input`` to measure that constant. With ``example_input`` the network's
    output is checked to be unchanged to ``atol`` (relative to its magnitude)."""
    check_int(n, "the number of units to add", minimum=1)
    producer, reader = _module(model, site.layer), _module(model, site.consumer)
    conv_in = isinstance(reader, _CONV)
    w = producer.weight
    incoming = w.new_zeros(n, site.fan_in) if incoming is None else incoming.to(w)
    if tuple(incoming.shape) != (n, site.fan_in):
        raise ConfigError(f"incoming weights for {n} units of {site.layer!r} must have shape ({n}, {site.fan_in}), got {tuple(incoming.shape)}")
    speaking = outgoing is not None and bool(outgoing.any())
    if outgoing is not None and tuple(outgoing.shape) != (n, site.fan_out):
        raise ConfigError(f"outgoing weights for {n} units of {site.layer!r} must have shape ({n}, {site.fan_out}), got {tuple(outgoing.shape)}")
    if speaking:
        if incoming[outgoing.abs().sum(dim=1) > 0].any():
            raise ConfigError(
                f"a new unit of {site.layer!r} has both incoming and outgoing weights: that would change the "
                "network's output. Zero one side (GradMax: zero incoming; random growth: zero outgoing)"
            )
        if site.norms:
            raise ConfigError(f"units of {site.layer!r} pass through BatchNorm {site.norms}; grow them with zero outgoing weights")
        if reader.bias is None:
            raise ConfigError(f"{site.consumer!r} has no bias to absorb the new units' constant output; grow with zero outgoing weights")
        if conv_in and any(p != 0 for p in _as_tuple(reader.padding)):
            raise ConfigError(
                f"{site.consumer!r} zero-pads its input, so a constant new channel changes its output at the "
                "borders; grow with zero outgoing weights, or use an unpadded consumer"
            )
        if example_input is None:
            raise ConfigError("growing with outgoing weights needs example_input to measure the new units' constant output")
    if bias and producer.bias is None:
        raise ConfigError(f"{site.layer!r} has no bias; grow it with bias=0")
    before = _output(model, example_input)

    replace_parameter(producer, "weight", torch.cat([w, incoming.reshape(n, *w.shape[1:])]), optimizer, 0)
    if producer.bias is not None:
        replace_parameter(producer, "bias", torch.cat([producer.bias, producer.bias.new_full((n,), bias)]), optimizer, 0)
    _set_width(producer, "out", n)
    for name in site.norms:
        _grow_norm(_module(model, name), n, optimizer)
    rw = reader.weight
    cols = n if conv_in else n * site.positions
    widened = replace_parameter(reader, "weight", torch.cat([rw, rw.new_zeros(rw.shape[0], cols, *rw.shape[2:])], dim=1), optimizer, 1)
    _set_width(reader, "in", cols)
    if speaking:
        constants = _constants(_consumer_input(model, reader, example_input), site, n, conv_in)
        if conv_in:
            block = outgoing.to(rw).reshape(n, rw.shape[0], *rw.shape[2:]).transpose(0, 1)
            absorbed = (block.flatten(2).sum(dim=2) * constants).sum(dim=1)
        else:
            block = outgoing.to(rw).reshape(n, rw.shape[0], site.positions).permute(1, 0, 2).reshape(rw.shape[0], cols)
            absorbed = block @ constants
        widened[:, -cols:] = block
        reader.bias.sub_(absorbed)
    grown = replace(site, units=site.units + n)
    after = _output(model, example_input)
    if before is not None:
        scale = max(1.0, float(before.abs().max()))
        err = float((after - before).abs().max())
        if not err <= atol * scale:
            raise GrowthError(
                f"adding {n} units to {site.layer!r} changed the network output by {err:.3g} "
                f"(allowed {atol * scale:.3g}): an op between {site.layer!r} and {site.consumer!r} does not "
                "map a constant channel to a constant; grow with zero outgoing weights"
            )
    return grown


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _set_width(module: nn.Module, side: str, n: int) -> None:
    if isinstance(module, nn.Linear):
        attr = "out_features" if side == "out" else "in_features"
    else:
        attr = "out_channels" if side == "out" else "in_channels"
    setattr(module, attr, getattr(module, attr) + n)


def _output(model: nn.Module, example: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The output in eval mode (BatchNorm statistics untouched), or None without an example."""
    if example is None:
        return None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(example).detach().clone()
    finally:
        model.train(was_training)
