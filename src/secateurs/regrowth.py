"""Regrowth rules: which pruned connections come back.

A rule turns the current state into *grow scores* (higher = regrow first), one tensor per
prunable weight; :func:`secateurs.engine.drop_and_grow` then grows the top ones among the
inactive connections, so a rule never has to care about which ones are active.

- ``random``   SET (Mocanu et al. 2018): explore the topology blindly.
- ``gradient`` RigL (Evci et al. 2020) and GraNet's zero-cost neuroregeneration (Liu et al.
  2021, Eq. 3): |dL/dw| of the *dense* gradient the last backward already computed.
- ``cosine``   CTRE (Atashgahi et al. 2022): Hebbian-like, connect input and output units
  whose activations are most similar (|cosine| over a batch), no dense gradient needed; an
  ``explore`` share of each layer's growth is random (the paper's random topology exploration).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from .errors import ConfigError
from .layers import layer_type
from .outputs import split_batch
from .registry import Registry
from .scores import random as random_scores


@dataclass
class GrowContext:
    """What a rule may look at when an update happens.

    ``counts`` is how many connections each layer will grow; ``batch`` is one ``(x, y)``
    batch drawn for rules that need activations (None otherwise); ``gradients`` holds |grad|
    captured before the masks zeroed the pruned weights' gradients (None: read ``.grad``).
    """

    model: nn.Module
    weights: Mapping[str, torch.Tensor]
    masks: Mapping[str, torch.Tensor]
    counts: Mapping[str, int]
    generator: torch.Generator
    batch: tuple | None = None
    gradients: Mapping[str, torch.Tensor] | None = None


REGROWTH: Registry[Callable[..., "RegrowthRule"]] = Registry("regrowth rule")


class RegrowthRule:
    """Base of the rules: ``scores(ctx)`` returns grow scores keyed like ``ctx.weights``."""

    #: the rule reads the dense gradient, so it must run before gradients are masked
    needs_gradient: bool = False
    #: the rule needs a batch of data (``ctx.batch``)
    needs_batch: bool = False

    def scores(self, ctx: GrowContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError


@REGROWTH.register("random", "uniformly random among pruned connections (SET)")
class RandomRegrowth(RegrowthRule):
    def scores(self, ctx: GrowContext) -> dict[str, torch.Tensor]:
        return random_scores(ctx.weights, ctx.generator)  # the shared random score


@REGROWTH.register("gradient", "largest dense-gradient magnitude (RigL, GraNet)")
class GradientRegrowth(RegrowthRule):
    needs_gradient = True

    def scores(self, ctx: GrowContext) -> dict[str, torch.Tensor]:
        return dict(ctx.gradients) if ctx.gradients is not None else regrow_by_gradient(ctx.weights)


@REGROWTH.register("cosine", "largest |cosine similarity| of unit activations, plus random exploration (CTRE)")
class CosineRegrowth(RegrowthRule):
    needs_batch = True

    def __init__(self, explore: float = 0.0):
        if not 0.0 <= explore <= 1.0:
            raise ConfigError(f"explore must be in [0, 1] (the random share of each layer's growth), got {explore!r}")
        self.explore = explore

    def scores(self, ctx: GrowContext) -> dict[str, torch.Tensor]:
        if ctx.batch is None:
            raise ConfigError(
                "cosine regrowth needs activations: give the sparsifier batches=<an iterable of (x, y) "
                "batches, e.g. an unshuffled DataLoader>"
            )
        scores = regrow_by_cosine(ctx.model, ctx.weights, split_batch(ctx.batch)[0])
        if self.explore > 0:
            scores = mix_random(scores, ctx.masks, ctx.counts, self.explore, ctx.generator)
        return scores


def build_regrowth(rule: str | RegrowthRule, **params) -> RegrowthRule:
    """A rule from its name (unknown names list the known ones) or an instance, unchanged."""
    if isinstance(rule, RegrowthRule):
        if params:
            raise ConfigError(f"regrowth parameters {sorted(params)} given with a ready-made rule instance")
        return rule
    factory = REGROWTH.get(rule)
    try:
        return factory(**params)
    except TypeError as e:
        raise ConfigError(f"regrowth rule {rule!r}: {e}") from None


# -- the score functions ------------------------------------------------------------------
def regrow_by_gradient(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """|grad| of every weight, active or not: the loss decreases fastest along the largest
    gradients (RigL §3), and the gradient is already there after backward (GraNet: zero cost)."""
    out = {}
    for name, w in weights.items():
        if w.grad is None:
            raise ConfigError(
                f"{name} has no gradient: gradient regrowth reads the last backward's gradients, so "
                "call sparsifier.step() after optimizer.step() and before optimizer.zero_grad()"
            )
        out[name] = w.grad.detach().abs()
    return out


def _owners(model: nn.Module, names) -> dict[str, nn.Module]:
    """The layer owning each weight; a weight must be the parameter of a registered layer type."""
    params = dict(model.named_parameters())
    layer_of = {}  # id of a registered layer's weight -> the layer, in one pass over the modules
    for module in model.modules():
        kind = layer_type(module)
        if kind is not None and module._parameters.get(kind.param) is not None:
            layer_of.setdefault(id(module._parameters[kind.param]), module)
    owners = {}
    for name in names:
        owner = layer_of.get(id(params[name])) if name in params else None
        if owner is None:
            raise ConfigError(
                f"cosine regrowth compares a layer's input and output activations; {name} is not the weight "
                "of a registered layer type (Linear, Conv, transformers' Conv1D, or one registered with "
                "secateurs.register_layer); exclude it or use gradient / random regrowth"
            )
        owners[name] = owner
    return owners


def _unit_activations(t: torch.Tensor, linear: bool) -> torch.Tensor:
    """(samples, units): a Linear sees its last dim as units; a conv averages over space."""
    t = t.detach().float()
    if linear:
        return t.reshape(-1, t.shape[-1])
    return t.flatten(2).mean(dim=2)


def _abs_cosine(out_act: torch.Tensor, in_act: torch.Tensor) -> torch.Tensor:
    """|cos| between every output unit's and every input unit's activation vector."""
    o = out_act / out_act.norm(dim=0, keepdim=True).clamp_min(1e-12)
    i = in_act / in_act.norm(dim=0, keepdim=True).clamp_min(1e-12)
    return (o.T @ i).abs()


@torch.no_grad()
def regrow_by_cosine(model: nn.Module, weights: Mapping[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """CTRE's similarity score: for weight ``w[o, i, ...]`` the |cosine similarity| between
    the activations of output unit ``o`` and input unit ``i`` over the batch ``x`` (conv
    channels averaged over space, the kernel positions sharing their channel pair's score).

    Runs one forward pass in eval mode (no batch-norm statistics change) with temporary hooks.
    """
    from .masks import unwrap_model
    from .outputs import call_model

    model = unwrap_model(model)
    owners = _owners(model, weights)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name):
        def record(module, inputs, output):
            seen[name] = (inputs[0], output)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in owners.items()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        call_model(model, x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    scores = {}
    for name, module in owners.items():
        if name not in seen:
            raise ConfigError(f"{name} was not used in the forward pass, so it has no activations to compare")
        inp, out = seen[name]
        w = weights[name]
        linear = w.dim() == 2  # Linear-like: units on the last axis of its input and output
        sim = _abs_cosine(_unit_activations(out, linear), _unit_activations(inp, linear))  # (out, in)
        if linear:
            scores[name] = (sim if layer_type(module).output_axis == 0 else sim.T).contiguous().to(w.device)
            continue
        groups = module.groups
        out_c, in_per_group = w.shape[0], w.shape[1]
        group_of_out = torch.arange(out_c, device=sim.device) // (out_c // groups)
        cols = group_of_out[:, None] * in_per_group + torch.arange(in_per_group, device=sim.device)[None, :]
        pair = sim.gather(1, cols)  # (out, in/groups)
        scores[name] = pair.reshape(out_c, in_per_group, *([1] * (w.dim() - 2))).expand_as(w).contiguous().to(w.device)
    return scores


def mix_random(
    scores: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    counts: Mapping[str, int],
    explore: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Make ``round(explore * counts[name])`` uniformly chosen inactive connections of each
    layer win the growth outright; the rest is still decided by ``scores``."""
    from .selection import topk_mask

    top = torch.finfo(torch.float32).max
    out = {}
    for name, s in scores.items():
        s = s.detach().float().clone()
        m = masks[name]
        n_random = round(explore * counts.get(name, 0))
        if n_random:
            noise = random_scores({name: m}, generator)[name].masked_fill(m, -1.0)
            s[topk_mask(noise, n_random)] = top
        out[name] = s
    return out
