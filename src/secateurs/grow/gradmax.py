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

``gradmax_incoming`` is the mirror image: zero outgoing weights, and incoming weights that
maximise the gradient of the outgoing ones. With the activation linearised that gradient is
``G w``, so the best incoming vectors are ``G``'s top *right* singular vectors (the same
measured matrix); a ReLU is not linear, so each vector's sign is chosen by measuring both.

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

__all__ = [
    "GROWTH_INITS", "ZERO_INCOMING", "gradmax_directions", "growth_gradient", "growth_matrix",
    "new_unit_weights", "outgoing_gradient",
]

GROWTH_INITS = ("gradmax", "gradmax_incoming", "random", "zero")
#: inits whose new units have zero incoming weights: they output a constant, and need a
#: positive bias to start in a ReLU's linear part (see :mod:`secateurs.grow.widen`)
ZERO_INCOMING = ("gradmax", "zero")

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


def growth_matrix(
    model: nn.Module,
    site: GrowthSite,
    batches: Sequence[Batch],
    *,
    bias: float,
    example_input: torch.Tensor,
    loss_fn: Callable = F.cross_entropy,
    chunk: int = 256,
) -> torch.Tensor:
    """``G`` (``(fan_out, fan_in)``, float64): row ``j`` is the gradient of a new unit's incoming
    weights when its outgoing weights are ``e_j`` (zero incoming weights, activation in its
    linear part). Read the other way, ``G @ w`` is the gradient of a new unit's outgoing
    weights when its incoming weights are ``w`` and its outgoing weights zero (linearised)."""
    rows = []
    eye = torch.eye(site.fan_out, dtype=torch.float32)
    for start in range(0, site.fan_out, chunk):
        basis = eye[start:start + chunk].to(model.get_submodule(site.layer).weight)
        rows.append(growth_gradient(model, site, basis, batches, bias=bias, example_input=example_input, loss_fn=loss_fn))
    return torch.cat(rows).double()


def _top_singular(g: torch.Tensor, n: int, side: str, generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` top left (``side="left"``) or right singular vectors of ``g`` as rows, and
    the singular values. Beyond the rank every direction gives zero gradient: the rest are
    random, orthogonal to the chosen ones while there is room, merely unit-norm after that."""
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    k = min(n, int((s > s[0] * 1e-7).sum()) if s.numel() and s[0] > 0 else 0)
    directions = u[:, :k].T if side == "left" else vh[:k]
    dim = g.shape[0] if side == "left" else g.shape[1]
    if k < n:
        extra = torch.randn(dim, n - k, dtype=torch.float64, generator=generator)
        room = min(n - k, dim - k)
        if room:
            block = extra[:, :room] - directions.T @ (directions @ extra[:, :room])
            extra[:, :room] = torch.linalg.qr(block)[0]
        extra = extra / extra.norm(dim=0, keepdim=True)
        directions = torch.cat([directions, extra.T])
    return directions.float(), s.float()


def outgoing_gradient(
    model: nn.Module, site: GrowthSite, incoming: torch.Tensor, batches: Sequence[Batch], *,
    example_input: torch.Tensor, loss_fn: Callable = F.cross_entropy,
) -> torch.Tensor:
    """Gradient of the loss w.r.t. the outgoing weights of units grown on a copy of ``model``
    with these ``incoming`` weights and zero outgoing weights: ``(units, fan_out)``."""
    probe = copy.deepcopy(model)
    n = incoming.shape[0]
    add_units(probe, site, n, incoming=incoming, example_input=example_input)
    reader = probe.get_submodule(site.consumer)
    for x, y in batches:
        (loss_fn(probe(x), y) / len(batches)).backward()
    grad = reader.weight.grad
    if grad.dim() > 2:  # conv consumer: (out, n, kh, kw) -> (n, out*kh*kw)
        return grad[:, -n:].transpose(0, 1).flatten(1).detach()
    return grad[:, -n * site.positions:].reshape(grad.shape[0], n, site.positions).transpose(0, 1).flatten(1).detach()


def gradmax_directions(
    model: nn.Module,
    site: GrowthSite,
    n: int,
    batches: Iterable[Batch],
    *,
    bias: float,
    example_input: torch.Tensor,
    side: str = "outgoing",
    loss_fn: Callable = F.cross_entropy,
    chunk: int = 256,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` unit-norm vectors (rows) for new units, and the singular values of ``G``
    (:func:`growth_matrix`, largest first).

    ``side="outgoing"`` (the paper's GradMax): outgoing vectors ``(n, fan_out)`` for units
    with zero incoming weights, maximising the gradient norm of those incoming weights: the
    top left singular vectors of ``G``. ``side="incoming"``: incoming vectors ``(n, fan_in)``
    for units with zero outgoing weights, maximising the gradient norm of the outgoing ones.
    With the activation linearised that gradient is ``G @ w``, so the answer is ``G``'s top
    right singular vectors; a ReLU is not linear (it passes ``w . h`` but not ``-w . h``), so
    each vector's sign is the one with the larger measured gradient."""
    if side not in ("outgoing", "incoming"):
        raise ConfigError(f"side must be 'outgoing' or 'incoming', got {side!r}")
    batches = list(batches)
    g = growth_matrix(model, site, batches, bias=bias, example_input=example_input, loss_fn=loss_fn, chunk=chunk)
    if side == "outgoing":
        return _top_singular(g, n, "left", generator)
    directions, s = _top_singular(g, n, "right", generator)
    both = outgoing_gradient(model, site, torch.cat([directions, -directions]), batches,
                             example_input=example_input, loss_fn=loss_fn).norm(dim=1)
    flip = both[n:] > both[:n]
    return torch.where(flip[:, None], -directions, directions), s


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
    side = "incoming" if init == "gradmax_incoming" else "outgoing"
    directions, _ = gradmax_directions(
        model, site, n, batches, bias=bias, example_input=example_input, side=side, loss_fn=loss_fn, generator=generator
    )
    if side == "incoming":
        return directions * scale * float(incoming_norm.mean()), None
    return None, directions * scale * float(outgoing_norm.mean())
