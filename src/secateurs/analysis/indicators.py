"""Training-free architecture indicators after TE-NAS (Chen, Gong & Wang, ICLR 2021,
"Neural Architecture Search on ImageNet in Four GPU Hours: A Theoretically Inspired
Perspective").

TE-NAS ranks untrained candidate networks by two numbers measured at initialisation:

- **trainability**: the condition number ``kappa = lambda_max / lambda_min`` of the empirical
  neural tangent kernel ``Theta = J J^T`` on a batch. Gradient descent on a wide network
  converges along each NTK eigendirection at a rate set by its eigenvalue, so a large spread
  (large kappa) means some directions barely train; lower is better;
- **expressivity**: the number of linear regions of a ReLU network, counted as the distinct
  ReLU on/off patterns a set of inputs produces; more is better;

and combines them by summing the two rankings (:func:`rank_architectures`). Only torch and
numpy are used, so any ``nn.Module`` can be measured outside secateurs' experiments.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call, jacrev

from ..errors import ConfigError
from ..outputs import logits_of
from ..validate import check_int

__all__ = ["empirical_ntk", "ntk_condition_number", "linear_regions", "indicators", "rank_architectures"]


def _forward(model: nn.Module, params: Mapping[str, torch.Tensor], inputs: torch.Tensor, train_mode: bool):
    """``model(inputs)`` with ``params`` and *copies* of the buffers, in the requested mode:
    a train-mode batch-norm then uses batch statistics (as TE-NAS measures) without touching
    the model's running statistics, so measuring never changes the network."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    was_training = model.training
    model.train(train_mode)
    try:
        return logits_of(functional_call(model, (dict(params), buffers), (inputs,)))
    finally:
        model.train(was_training)


def empirical_ntk(
    model: nn.Module, inputs: torch.Tensor, *, train_mode: bool = True, chunk_size: int | None = None
) -> torch.Tensor:
    """The empirical NTK ``Theta = J J^T`` (``n x n``, float64) of ``model`` on ``inputs``.

    Row ``i`` of ``J`` is the gradient of the *sum* of sample ``i``'s outputs with respect to
    every trainable parameter (TE-NAS's reduction of the multi-output kernel to one output).
    ``J`` comes from one batched forward and ``torch.func.jacrev`` (``n`` vectorised
    backward passes, ``chunk_size`` at a time to bound memory), so batch-norm couples the
    samples exactly as in a training step. For a linear ``f(x) = W x + b`` with ``C`` outputs,
    ``Theta_ij = C (x_i . x_j + 1)``.
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ConfigError("the model has no trainable parameters; the NTK is a kernel of parameter gradients")
    if inputs.dim() < 2 or inputs.shape[0] < 1:
        raise ConfigError(f"inputs must be a batch [n, ...] with n >= 1, got shape {tuple(inputs.shape)}")
    n = inputs.shape[0]

    def summed_outputs(p):
        return _forward(model, p, inputs, train_mode).reshape(n, -1).sum(dim=1)

    jacobian = jacrev(summed_outputs, chunk_size=chunk_size)(params)
    theta = torch.zeros(n, n, dtype=torch.float64, device=inputs.device)
    for block in jacobian.values():  # Theta = sum over parameter tensors of J_p J_p^T
        j = block.reshape(n, -1).double()
        theta += j @ j.T
    return theta


def ntk_condition_number(
    model: nn.Module, inputs: torch.Tensor, *, train_mode: bool = True, chunk_size: int | None = None
) -> dict:
    """TE-NAS trainability: ``lambda_max / lambda_min`` of :func:`empirical_ntk`.

    Eigenvalues come from ``eigvalsh`` in float64. ``Theta`` is positive semi-definite, so a
    singular kernel (more samples than parameters, duplicate inputs, a sample on which every
    unit of a layer is off) has ``lambda_min = 0`` up to the float64 rounding of the
    eigensolver; ``lambda_min <= n * eps64 * lambda_max`` is treated as that zero and gives
    ``condition_number = inf``: no finite ratio describes it, and it ranks as the least
    trainable. Returns ``{"condition_number", "eig_max", "eig_min", "batch"}``.
    """
    if inputs.shape[0] < 2:
        raise ConfigError("the NTK condition number needs a batch of at least 2 inputs; one gives kappa = 1 always")
    eig = torch.linalg.eigvalsh(empirical_ntk(model, inputs, train_mode=train_mode, chunk_size=chunk_size))
    lmax, lmin = float(eig[-1]), float(eig[0])
    singular = lmin <= inputs.shape[0] * torch.finfo(torch.float64).eps * max(lmax, 0.0)
    return {"condition_number": math.inf if singular or lmax <= 0 else lmax / lmin, "eig_max": lmax, "eig_min": lmin,
            "batch": int(inputs.shape[0])}


@torch.no_grad()
def linear_regions(model: nn.Module, inputs: torch.Tensor, *, train_mode: bool = True) -> dict:
    """TE-NAS expressivity: how many distinct ReLU activation patterns ``inputs`` produce.

    A ReLU network is affine on each set of inputs sharing one on/off pattern of all its
    units, so the distinct patterns over the samples count the linear regions those samples
    fall into (at most ``n``: with high-dimensional inputs and wide layers it saturates).
    The pattern is the sign of each ``nn.ReLU`` module's input, recorded by temporary
    pre-forward hooks (before an in-place ReLU overwrites it); ReLUs applied as functions
    are invisible, so a model without ``nn.ReLU`` modules is an error.
    """
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    if not relus:
        raise ConfigError(
            f"{type(model).__name__} has no nn.ReLU modules, so it has no activation patterns to count; "
            "linear regions are defined for ReLU networks built with nn.ReLU (not F.relu)"
        )
    n = int(inputs.shape[0])
    packed: list[np.ndarray] = []
    units = 0

    def record(module, args):
        nonlocal units
        x = args[0]
        if x.shape[0] != n:
            raise ConfigError(f"a ReLU saw a batch of {x.shape[0]} for {n} inputs; the model must keep the batch dimension")
        on = (x > 0).reshape(n, -1).cpu().numpy()
        units += on.shape[1]
        packed.append(np.packbits(on, axis=1))  # one injective code per layer; rows stay comparable

    handles = [m.register_forward_pre_hook(record) for m in relus]
    try:
        params = {k: p.detach() for k, p in model.named_parameters()}
        _forward(model, params, inputs, train_mode)
    finally:
        for h in handles:
            h.remove()
    patterns = np.concatenate(packed, axis=1)
    return {"regions": int(np.unique(patterns, axis=0).shape[0]), "samples": n, "relu_units": units}


def indicators(
    factory: Callable[[], nn.Module],
    ntk_inputs: torch.Tensor,
    region_inputs: torch.Tensor | None = None,
    *,
    seed: int = 0,
    repeats: int = 3,
    train_mode: bool = True,
    chunk_size: int | None = None,
) -> dict:
    """Both TE-NAS indicators of the architecture ``factory()`` builds, over ``repeats``
    initialisations.

    Each repeat seeds torch's RNG with a seed drawn from ``torch.Generator().manual_seed(seed)``
    and builds a fresh model, inside ``torch.random.fork_rng`` so the caller's RNG state is
    untouched: the same ``seed`` gives identical numbers. The condition number is averaged
    in log space (``condition_number`` is the geometric mean) because it spans orders of
    magnitude and one bad draw would dominate an arithmetic mean; ``regions`` is the mean
    count. Regions are counted on ``region_inputs`` (default: ``ntk_inputs``).
    """
    check_int(repeats, "repeats", minimum=1)
    if isinstance(factory, nn.Module):
        raise ConfigError("pass a function that builds the model (e.g. lambda: MLP(...)), not a model: "
                          "each repeat needs a fresh initialisation")
    region_inputs = ntk_inputs if region_inputs is None else region_inputs
    generator = torch.Generator().manual_seed(seed)
    per_init = []
    for init_seed in torch.randint(0, 2**62, (repeats,), generator=generator).tolist():
        with torch.random.fork_rng():
            torch.manual_seed(init_seed)
            model = factory().to(ntk_inputs.device)
            ntk = ntk_condition_number(model, ntk_inputs, train_mode=train_mode, chunk_size=chunk_size)
            regions = linear_regions(model, region_inputs, train_mode=train_mode)
        per_init.append({"seed": init_seed, **ntk, "regions": regions["regions"]})
    log_kappa = sum(math.log(r["condition_number"]) for r in per_init) / repeats
    return {
        "condition_number": math.exp(log_kappa),
        "log_condition_number": log_kappa,
        "regions": sum(r["regions"] for r in per_init) / repeats,
        "relu_units": regions["relu_units"],
        "region_samples": regions["samples"],
        "ntk_batch": ntk["batch"],
        "repeats": repeats,
        "per_init": per_init,
    }


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ascending ranks; tied values share the mean of their positions."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def rank_architectures(
    rows: Sequence[Mapping], *, trainability: str = "condition_number", expressivity: str = "regions"
) -> list[dict]:
    """TE-NAS's combined ranking: copies of ``rows`` (same order) with ``trainability_rank``
    (1 = smallest condition number), ``expressivity_rank`` (1 = most regions) and their sum
    ``tenas_rank``; the lowest sum is the architecture TE-NAS would pick. Summing ranks
    rather than raw values makes two indicators on unrelated scales count equally.
    """
    if not rows:
        return []
    for key in (trainability, expressivity):
        missing = [i for i, r in enumerate(rows) if key not in r]
        if missing:
            raise ConfigError(f"rows {missing} lack {key!r}; every row needs {trainability!r} and {expressivity!r}")
    kappa = np.array([float(r[trainability]) for r in rows])
    regions = np.array([float(r[expressivity]) for r in rows])
    if np.isnan(kappa).any() or np.isnan(regions).any():
        raise ConfigError(f"{trainability!r} or {expressivity!r} is NaN in some rows; NaN cannot be ranked")
    t, e = _ranks(kappa), _ranks(-regions)
    return [{**r, "trainability_rank": float(a), "expressivity_rank": float(b), "tenas_rank": float(a + b)}
            for r, a, b in zip(rows, t, e)]
