"""How new units are initialised: GradMax (Evci et al., 2022), random, or zero.

GradMax gives new units zero incoming weights and chooses their outgoing weights to make
the gradient of the incoming weights as large as possible (at a fixed norm), so the new
units learn fast without changing the function. With zero incoming weights and the
activation in its linear part, the gradient of unit ``u``'s incoming weights is linear in
its outgoing weights ``w_u``: ``G^T w_u``. ``G`` is measured exactly with autograd on the
real network: one candidate unit per outgoing direction ``e_j`` is grown on a copy, and the
gradient of candidate ``j``'s incoming weights is row ``j`` of ``G`` (this works through
pooling and flattening, which the paper's closed form does not cover). The best ``k``
outgoing vectors of a given total norm are then the top-``k`` left singular vectors of
``G``: no other choice gives a larger gradient norm.

Random growth draws incoming weights from a Gaussian and sets outgoing weights to zero;
zero growth sets both to zero (new units start identical and, for a ReLU at bias 0, dead).
New incoming (random) or outgoing (GradMax) vectors get ``scale`` times the mean norm of the
existing units' vectors (the paper's ``mean_norm`` scaling).
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .widen import GrowthSite, add_units, unit_norms

__all__ = ["GROWTH_INITS", "gradmax_directions", "growth_gradient", "new_unit_weights"]

GROWTH_INITS = ("gradmax", "random", "zero")

Batch = tuple[torch.Tensor, torch.Tensor]


def growth_gradient(
    model: nn.Module,
    site: GrowthSite,
    outgoing: torch.Tensor,
    batches: Sequence[Batch],
    *,
    bias: float,
    example_input: torch.Tensor,
    loss_fn: Callable = F.cross_entropy,
) -> torch.Tensor:
    """Gradient of the loss (mean over ``batches``) w.r.t. the incoming weights of units grown
    on a copy of ``model`` with zero incoming weights and the given ``outgoing`` weights:
    ``(units, fan_in)``. The model itself is untouched."""
    if not batches:
        raise ConfigError("GradMax needs at least one batch of training data to measure gradients")
    probe = copy.deepcopy(model)
    for p in probe.parameters():
        p.grad = None
    n = outgoing.shape[0]
    add_units(probe, site, n, outgoing=outgoing, bias=bias, example_input=example_input)
    weight = probe.get_submodule(site.layer).weight
    for x, y in batches:
        (loss_fn(probe(x), y) / len(batches)).backward()
    return weight.grad[-n:].flatten(1).detach()


def gradmax_directions(
    model: nn.Module,
    site: GrowthSite,
    n: int,
    batches: Iterable[Batch],
    *,
    bias: float,
    example_input: torch.Tensor,
    loss_fn: Callable = F.cross_entropy,
    chunk: int = 256,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` unit-norm outgoing vectors that maximise the new units' gradient norm
    (rows, ``(n, fan_out)``) and the singular values of ``G`` (largest first). Beyond the
    rank of ``G`` the remaining vectors are random (orthogonal to the others while
    ``fan_out`` allows)."""
    batches = list(batches)
    rows = []
    eye = torch.eye(site.fan_out, dtype=torch.float32)
    for start in range(0, site.fan_out, chunk):
        basis = eye[start:start + chunk].to(model.get_submodule(site.layer).weight)
        rows.append(growth_gradient(model, site, basis, batches, bias=bias, example_input=example_input, loss_fn=loss_fn))
    g = torch.cat(rows).double()  # (fan_out, fan_in): row j is the gradient for outgoing e_j
    u, s, _ = torch.linalg.svd(g, full_matrices=False)
    k = min(n, int((s > s[0] * 1e-7).sum()) if s.numel() and s[0] > 0 else 0)
    directions = u[:, :k].T
    if k < n:
        # beyond the rank every direction gives zero gradient: random ones, orthogonal to the
        # chosen ones while there is room, and merely unit-norm after that
        extra = torch.randn(site.fan_out, n - k, dtype=torch.float64, generator=generator)
        room = min(n - k, site.fan_out - k)
        if room:
            block = extra[:, :room] - directions.T @ (directions @ extra[:, :room])
            extra[:, :room] = torch.linalg.qr(block)[0]
        extra = extra / extra.norm(dim=0, keepdim=True)
        directions = torch.cat([directions, extra.T])
    return directions.float(), s.float()


def new_unit_weights(
    model: nn.Module,
    site: GrowthSite,
    n: int,
    init: str,
    *,
    scale: float,
    bias: float,
    batches: Optional[Iterable[Batch]] = None,
    example_input: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    loss_fn: Callable = F.cross_entropy,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(incoming, outgoing)`` for ``n`` new units of ``site`` by ``init`` (None = zeros)."""
    if init not in GROWTH_INITS:
        raise ConfigError(f"unknown growth init {init!r}; known: {', '.join(GROWTH_INITS)}")
    if init == "zero":
        return None, None
    incoming_norm, outgoing_norm = unit_norms(model, site)
    if init == "random":
        w = torch.randn(n, site.fan_in, generator=generator)
        w = w / w.norm(dim=1, keepdim=True) * scale * float(incoming_norm.mean())
        return w, None
    if batches is None or example_input is None:
        raise ConfigError("GradMax growth needs training batches and an example input")
    directions, _ = gradmax_directions(
        model, site, n, batches, bias=bias, example_input=example_input, loss_fn=loss_fn, generator=generator
    )
    return None, directions * scale * float(outgoing_norm.mean())
