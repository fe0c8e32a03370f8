"""Hessian-vector products and the Hessian's dominant eigenvalue (spectral radius).

``H v`` is computed by double backward (Pearlmutter 1994): the gradient is built with
``create_graph=True`` once, and each product differentiates ``g . v`` again, so the Hessian
itself is never formed (cost: about two backward passes per product). The dominant eigenvalue
comes from power iteration on those products, from a seeded random start, stopping when the
Rayleigh quotient changes by less than ``tol`` (relative) between iterations.

Power iteration converges to the eigenvalue of largest *magnitude*, so ``abs(eigenvalue)`` is
the spectral radius rho(H) = max |lambda_i|; it bounds the curvature term of any perturbation
``d``: ``|d^T H d| <= rho(H) ||d||^2``.

A model whose loss is not twice differentiable in its parameters (an ``argmax``, a
``.detach()``, an integer cast between a parameter and the loss) is refused with a
:class:`HessianUnavailableError` naming the module that drops the gradient, or the parameters
that get none, or the op whose backward cannot be differentiated again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = [
    "HessianUnavailableError", "HessianOperator", "hessian_vector_product", "EigenResult",
    "top_eigenvalue", "model_hessian",
]


class HessianUnavailableError(ValueError):
    """The loss has no second derivative with respect to (some of) the parameters."""


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


class HessianOperator:
    """``v -> H v`` for the Hessian of ``loss`` with respect to ``params``.

    Args:
        loss: a scalar tensor built from ``params`` (with grad enabled).
        params: the parameters (tensors requiring grad) the Hessian is taken over.
        names: their names, for error messages (default ``param0``, ``param1``, ...).
        broken: a hint of where the graph was cut (a module name), added to the error if
            some parameter gets no gradient; :func:`model_hessian` finds it with hooks.
    """

    def __init__(self, loss: torch.Tensor, params: Sequence[torch.Tensor], names: Sequence[str] | None = None,
                 broken: str | None = None):
        params = list(params)
        names = list(names) if names is not None else [f"param{i}" for i in range(len(params))]
        if not params:
            raise HessianUnavailableError("no parameters given: pass the tensors the Hessian is taken over")
        if len(names) != len(params):
            raise ValueError(f"got {len(names)} names for {len(params)} parameters")
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise HessianUnavailableError(
                f"the loss must be a scalar tensor, got {type(loss).__name__}"
                f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}; reduce it (e.g. .mean())")
        frozen = [n for n, p in zip(names, params) if not p.requires_grad]
        if frozen:
            raise HessianUnavailableError(
                f"parameters {frozen[:4]} do not require grad; leave frozen parameters out of params")
        where = f" ({broken})" if broken else ""
        if not loss.requires_grad:
            raise HessianUnavailableError(
                f"the loss does not depend differentiably on any parameter{where}: an op between the parameters and "
                "the loss has no derivative (argmax, comparison, integer cast, .detach(), torch.no_grad); "
                "use a differentiable surrogate (softmax instead of argmax) or take the Hessian of the part before it")
        grads = torch.autograd.grad(loss.reshape(()), params, create_graph=True, allow_unused=True)
        missing = [n for n, g in zip(names, grads) if g is None]
        if missing:
            raise HessianUnavailableError(
                f"the loss has no gradient with respect to {', '.join(missing[:4])}"
                f"{', ...' if len(missing) > 4 else ''}{where}: an op between them and the loss has no derivative "
                "(argmax, comparison, integer cast, .detach()), or they are unused; use a differentiable surrogate, "
                "or leave those parameters out of params")
        self.params, self.names, self.grads = params, names, list(grads)
        # a gradient without a graph is constant in every parameter (its Hessian rows are exactly
        # zero); when no gradient has one, the product is identically zero and there is nothing
        # to power-iterate: most likely the graph was cut after the first derivative
        self._live = [g.requires_grad for g in self.grads]
        if not any(self._live):
            raise HessianUnavailableError(
                f"the gradient of the loss with respect to {', '.join(names[:4])} does not depend on the parameters "
                "(its graph was cut: a custom autograd.Function whose backward is not differentiable, or a "
                ".detach() inside a backward), so the Hessian is not available by double backward")
        for name, g in zip(names, self.grads):
            if _delayed_error(g.grad_fn):
                raise HessianUnavailableError(
                    f"the gradient with respect to {name} passes through an op whose backward is first-order only "
                    "(a custom autograd.Function marked @once_differentiable: autograd put a DelayedError node in "
                    "the gradient's graph), so its second derivative is not available; give that Function a "
                    "differentiable backward (torch ops, no once_differentiable)")
        self.numel = sum(p.numel() for p in params)
        self.gradient = _flat([g.detach() for g in self.grads])

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a flat vector ``v`` (the parameters' order, flattened)."""
        if v.shape != (self.numel,):
            raise ValueError(f"v must be a flat vector of {self.numel} entries, got shape {tuple(v.shape)}")
        chunks = torch.split(v, [p.numel() for p in self.params])
        dot = sum((g * c.view_as(g)).sum() for g, c, ok in zip(self.grads, chunks, self._live) if ok)
        try:
            hv = torch.autograd.grad(dot, self.params, retain_graph=True, allow_unused=True)
        except RuntimeError as e:  # e.g. a backward marked @once_differentiable
            raise HessianUnavailableError(
                f"the second derivative is not available: autograd refused to differentiate the gradient again "
                f"({str(e).splitlines()[0]}); replace that op by one with a differentiable backward") from None
        return _flat([torch.zeros_like(p) if h is None else h.detach() for h, p in zip(hv, self.params)])


def _delayed_error(root) -> bool:
    """Whether a gradient's graph holds autograd's ``DelayedError`` node (type name ``Error``),
    which a ``@once_differentiable`` backward leaves where its own derivative would be."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ in ("Error", "DelayedError"):
            return True
        stack.extend(n for n, _ in node.next_functions)
    return False


def hessian_vector_product(loss: torch.Tensor, params: Sequence[torch.Tensor], vector: Sequence[torch.Tensor]
                           ) -> list[torch.Tensor]:
    """``H v`` with ``v`` given per parameter (same shapes); returns one tensor per parameter."""
    op = HessianOperator(loss, params)
    flat = op.matvec(_flat([torch.as_tensor(t, dtype=p.dtype) for t, p in zip(vector, params)]))
    return [c.view_as(p) for c, p in zip(torch.split(flat, [p.numel() for p in params]), params)]


@dataclass
class EigenResult:
    """The dominant eigenpair found by power iteration."""

    eigenvalue: float  #: signed; ``abs(eigenvalue)`` is the spectral radius
    vector: torch.Tensor  #: unit-norm eigenvector estimate (flat)
    iterations: int
    converged: bool

    @property
    def spectral_radius(self) -> float:
        return abs(self.eigenvalue)


def top_eigenvalue(matvec: Callable[[torch.Tensor], torch.Tensor] | HessianOperator, numel: int | None = None, *,
                   max_iter: int = 100, tol: float = 1e-4, seed: int = 0, dtype=None, device=None) -> EigenResult:
    """Dominant eigenvalue of a symmetric operator by power iteration.

    Starts from a standard normal vector drawn by a generator seeded with ``seed`` (same
    seed, same answer), and stops when the Rayleigh quotient ``v^T H v`` changes by at most
    ``tol * |quotient|`` between two iterations, or after ``max_iter`` products."""
    if isinstance(matvec, HessianOperator):
        op = matvec
        numel, matvec = op.numel, op.matvec
        dtype = dtype or op.params[0].dtype
        device = device or op.params[0].device
    if not isinstance(numel, int) or numel < 1:
        raise ValueError(f"numel must be the operator's size (an int >= 1), got {numel!r}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0 (a relative change of the eigenvalue estimate), got {tol!r}")
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(numel, generator=g, dtype=dtype or torch.float32).to(device)
    v /= v.norm()
    value, converged, it = 0.0, False, 0
    for it in range(1, max_iter + 1):
        hv = matvec(v)
        new = float(v @ hv)
        norm = hv.norm()
        if norm == 0:  # v is in the null space; the estimate 0 is exact along v
            value, converged = new, True
            break
        v = hv / norm
        if it > 1 and abs(new - value) <= tol * abs(new):
            value, converged = new, True
            break
        value = new
    return EigenResult(eigenvalue=value, vector=v, iterations=it, converged=converged)


def _cut_points(model: nn.Module) -> tuple[list, list[str]]:
    """Forward hooks that record the modules whose input requires grad but whose output
    does not (the module cut the graph: argmax, detach, integer cast inside it)."""
    found: list[str] = []

    def hook(name):
        def fn(module, args, output):
            ins = [a for a in args if isinstance(a, torch.Tensor)]
            outs = [output] if isinstance(output, torch.Tensor) else [
                o for o in (output if isinstance(output, (tuple, list)) else []) if isinstance(o, torch.Tensor)]
            if any(a.requires_grad for a in ins) and outs and not any(o.requires_grad for o in outs):
                found.append(f"module {name!r} ({type(module).__name__}) returns a tensor without gradient "
                             f"(dtype {outs[0].dtype}) from an input that has one")
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    return handles, found


def model_hessian(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  inputs: torch.Tensor, targets: torch.Tensor, params: Sequence[str] | None = None) -> HessianOperator:
    """The Hessian operator of ``loss_fn(model(inputs), targets)`` over the model's trainable
    parameters (or the named ``params``); a module that cuts the gradient is named in the error."""
    named = dict(model.named_parameters())
    if params is None:
        params = [n for n, p in named.items() if p.requires_grad]
    unknown = [n for n in params if n not in named]
    if unknown:
        raise ValueError(f"unknown parameter names {unknown[:4]}; the model has {list(named)[:6]}")
    handles, cuts = _cut_points(model)
    try:
        with torch.enable_grad():
            loss = loss_fn(model(inputs), targets)
    finally:
        for h in handles:
            h.remove()
    return HessianOperator(loss, [named[n] for n in params], list(params), broken=cuts[0] if cuts else None)  # hooks fire innermost first
