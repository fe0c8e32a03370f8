"""Layer allocation: how many weights each layer keeps under one global budget.

Every allocation returns ``{name: number of weights to keep}``; the counts are exact integers
so the achieved sparsity can be checked to the element. The rounding convention is single:
a layer (or a model) of ``n`` weights at sparsity ``s`` keeps ``n - round(s * n)``.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Mapping, Sequence

import torch

from .errors import ConfigError
from .selection import count, kth_largest, select_at_threshold
from .vocabulary import SCOPES  # the one vocabulary of scopes (see secateurs.vocabulary)


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    """Sparsity must lie in [0, 1): 1 would delete the whole network."""
    if not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity) or not 0.0 <= sparsity < 1.0:
        raise ConfigError(
            f"{what} must be in [0, 1) (the fraction of weights removed), got {sparsity!r}; "
            "e.g. 0.9 keeps 10% of the weights"
        )
    return float(sparsity)


def keep_count(numel: int, sparsity: float) -> int:
    """Weights kept out of ``numel`` at ``sparsity`` (the one rounding rule)."""
    return numel - round(sparsity * numel)


def uniform_keep(numel: Mapping[str, int], sparsity: float) -> dict[str, int]:
    """Every layer at the same sparsity (layer-wise magnitude pruning, Han et al. 2015)."""
    return {n: keep_count(c, sparsity) for n, c in numel.items()}


def layer_rates(
    names: Sequence[str], rate: float, output_rate: float | None = None, overrides: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Per-layer pruning rates (fraction of each layer's *remaining* weights removed per
    round): ``rate`` everywhere, ``output_rate`` for the last layer in model order (Frankle &
    Carbin 2019 prune the output layer at half the rate: fc 20%, output 10%) and
    ``overrides`` as ``{glob pattern: rate}`` (e.g. ``{"features.*": 0.1}`` for conv layers),
    applied last. A pattern that matches nothing is an error, not a silent no-op."""
    names = list(names)
    rates = {n: check_sparsity(rate, "pruning rate") for n in names}
    if output_rate is not None and names:
        rates[names[-1]] = check_sparsity(output_rate, "output-layer pruning rate")
    for pattern, value in (overrides or {}).items():
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ConfigError(f"layer-rate pattern {pattern!r} matches no prunable parameter; names are: {', '.join(names[:6])}")
        for n in hits:
            rates[n] = check_sparsity(value, f"pruning rate for {pattern!r}")
    return rates


def rate_keep(active: Mapping[str, int], rates: Mapping[str, float]) -> dict[str, int]:
    """Weights each layer keeps after removing ``rates[name]`` of its remaining ones (the
    layer-wise IMP round of Frankle & Carbin 2019), with :func:`keep_count`'s rounding."""
    missing = [n for n in active if n not in rates]
    if missing:
        raise ConfigError(f"no pruning rate for {', '.join(missing[:4])}; build the rates with layer_rates()")
    return {n: keep_count(a, rates[n]) for n, a in active.items()}


def erk_densities(shapes: Mapping[str, Sequence[int]], keep: int, kernel: bool = True) -> dict[str, float]:
    """Erdős–Rényi(-Kernel) densities (Mocanu et al. 2018; Evci et al. 2020, RigL §3).

    A layer's density is proportional to ``sum(shape) / prod(shape)`` (ERK) or, with
    ``kernel=False``, to ``(n_in + n_out) / (n_in * n_out)`` (ER), scaled so the layers keep
    ``keep`` weights in all. A layer whose density would exceed 1 is made dense and the scale
    is solved again for the rest (RigL's redistribution).
    """
    numel = {n: math.prod(s) for n, s in shapes.items()}
    if not 0 <= keep <= sum(numel.values()):
        raise ConfigError(f"ERK cannot keep {keep} weights in layers holding {sum(numel.values())}")

    def raw(shape: Sequence[int]) -> float:
        dims = list(shape) if kernel else list(shape[:2])
        return sum(dims) / math.prod(dims)

    dense: set[str] = set()
    while True:
        free = [n for n in shapes if n not in dense]
        budget = keep - sum(numel[n] for n in dense)
        if not free:
            break
        scale = budget / sum(raw(shapes[n]) * numel[n] for n in free)
        over = {n for n in free if scale * raw(shapes[n]) > 1.0}
        if not over:
            break
        dense |= over
    densities = {n: 1.0 for n in dense}
    densities.update({n: scale * raw(shapes[n]) for n in shapes if n not in dense})
    return densities


def counts_from_densities(numel: Mapping[str, int], densities: Mapping[str, float], keep: int) -> dict[str, int]:
    """Integer counts that follow ``densities`` and sum to exactly ``keep`` (largest remainder)."""
    real = {n: min(densities[n], 1.0) * numel[n] for n in numel}
    counts = {n: min(int(math.floor(v)), numel[n]) for n, v in real.items()}
    short = keep - sum(counts.values())
    by_remainder = sorted(numel, key=lambda n: (-(real[n] - counts[n]), n))
    while short > 0:
        progressed = False
        for n in by_remainder:
            if short and counts[n] < numel[n]:
                counts[n] += 1
                short -= 1
                progressed = True
        if not progressed:
            raise ConfigError(f"cannot place {keep} weights in layers holding {sum(numel.values())}")
    return counts


def global_keep(
    scores: Mapping[str, torch.Tensor], active: Mapping[str, torch.Tensor], keep: int
) -> dict[str, int]:
    """Per-layer counts of the ``keep`` highest active scores across all layers (one global
    threshold; Frankle & Carbin 2019, Blalock et al. 2020). Ties go to earlier layers."""
    names = list(scores)
    flat = torch.cat(
        [scores[n].reshape(-1).float().masked_fill(~active[n].reshape(-1), -math.inf) for n in names]
    )
    n_active = sum(count(active[n]) for n in names)
    if keep > n_active:
        raise ConfigError(
            f"the plan keeps {keep} weights but only {n_active} are active; pruning never "
            "revives weights (lower the sparsity target or use a regrowth method)"
        )
    if keep == 0:
        return {n: 0 for n in names}
    threshold = kth_largest(flat, keep).to(flat.device)
    chosen = select_at_threshold(flat, threshold, keep)
    sizes = [scores[n].numel() for n in names]
    return {n: count(part) for n, part in zip(names, torch.split(chosen, sizes))}


def allocate(
    scope: str,
    scores: Mapping[str, torch.Tensor],
    active: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    fixed_sparsity: Mapping[str, float] | None = None,
    allow_layer_collapse: bool = False,
) -> dict[str, int]:
    """Weights to keep per layer so that all layers together reach ``sparsity``.

    ``fixed_sparsity`` pins some layers (keep-dense layers at 0, per-layer overrides); the
    others share what is left of the budget by ``scope``: ``global`` (one score threshold),
    ``uniform`` (same sparsity per layer), ``erk`` / ``er`` (Evci et al. 2020).
    With ``uniform`` the pinned layers simply differ; with the others the total is exact.
    """
    check_sparsity(sparsity)
    scope = SCOPES.check(scope, "scope")
    fixed_sparsity = dict(fixed_sparsity or {})
    for name, s in fixed_sparsity.items():
        check_sparsity(s, f"sparsity of {name}")
    numel = {n: t.numel() for n, t in scores.items()}
    fixed = {n: keep_count(numel[n], s) for n, s in fixed_sparsity.items()}
    free = [n for n in numel if n not in fixed]

    if scope == "uniform":
        keep = {**uniform_keep({n: numel[n] for n in free}, sparsity), **fixed}
    else:
        total = keep_count(sum(numel.values()), sparsity)
        budget = total - sum(fixed.values())
        free_numel = sum(numel[n] for n in free)
        if budget < 0 or budget > free_numel or (budget > 0 and not free):
            raise ConfigError(
                f"{scope} allocation cannot reach sparsity {sparsity}: layers with fixed sparsity "
                f"keep {sum(fixed.values())} weights of the {total} allowed and the other layers hold "
                f"{free_numel}; lower the fixed layers' density, keep fewer layers dense or raise "
                "the target"
            )
        if scope == "global":
            free_keep = global_keep({n: scores[n] for n in free}, active, budget) if free else {}
        else:
            shapes = {n: tuple(scores[n].shape) for n in free}
            densities = erk_densities(shapes, budget, kernel=scope == "erk")
            free_keep = counts_from_densities({n: numel[n] for n in free}, densities, budget)
        keep = {**free_keep, **fixed}

    keep = {n: keep[n] for n in numel}  # model order
    collapsed = [n for n, k in keep.items() if k == 0 and numel[n] > 0]
    if collapsed and not allow_layer_collapse:
        raise ConfigError(
            f"sparsity {sparsity} with scope {scope!r} removes every weight of "
            f"{', '.join(collapsed[:4])}, which disconnects the network; lower the sparsity, "
            "keep those layers dense, use scope='erk', or pass allow_layer_collapse=True"
        )
    return keep
