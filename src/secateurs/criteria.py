"""Mask criteria: keep-scores from a weight's initial and final values.

Zhou, Lan, Liu & Yosinski (2019, "Deconstructing Lottery Tickets") compared which
``(w_init, w_final)`` pairs a lottery-ticket mask should keep, and found that criteria
favouring large final weights, and above all weights that kept their sign, work best. Each
criterion here is a pure function ``criterion(initial, final, generator) -> scores`` on one
tensor, higher = keep, so any of them plugs into the engine like a :mod:`~secateurs.scores`
score: :func:`make_score` binds the initial weights and returns a ``score(weights,
generator)`` for a :class:`~secateurs.methods.Sparsifier` (iterative magnitude pruning by
any criterion).

Randomness (the ``random`` control) comes only from the generator passed in, drawn on the
CPU, so scores are identical on any device and the global RNG is untouched.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from .errors import ConfigError
from .registry import Registry

Criterion = Callable[[torch.Tensor, torch.Tensor, "torch.Generator | None"], torch.Tensor]

CRITERIA: Registry[Criterion] = Registry("mask criterion")


def _pair(initial: torch.Tensor, final: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached ``(w_i, w_f)`` on ``final``'s device in one floating dtype."""
    wi, wf = initial.detach(), final.detach()
    dtype = torch.promote_types(wi.dtype, wf.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float32
    return wi.to(wf.device, dtype), wf.to(dtype=dtype)


@CRITERIA.register("large_final", "|w_f|: keep weights that ended large (plain lottery tickets)")
def large_final(initial: torch.Tensor, final: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """|w_f|, the criterion of Frankle & Carbin (2019); Zhou et al. (2019) baseline."""
    return _pair(initial, final)[1].abs()


@CRITERIA.register("small_final", "-|w_f|: keep weights that ended small (control)")
def small_final(initial: torch.Tensor, final: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """-|w_f|: the mirror of large_final, a control in Zhou et al. (2019)."""
    return -_pair(initial, final)[1].abs()


@CRITERIA.register("large_init", "|w_i|: keep weights that started large")
def large_init(initial: torch.Tensor, final: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """|w_i|: tests whether the initial magnitude alone picks a ticket (Zhou et al. 2019)."""
    return _pair(initial, final)[0].abs()


@CRITERIA.register("small_init", "-|w_i|: keep weights that started small (control)")
def small_init(initial: torch.Tensor, final: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """-|w_i|: the mirror of large_init (Zhou et al. 2019)."""
    return -_pair(initial, final)[0].abs()


@CRITERIA.register("large_init_large_final", "min(|w_i|, |w_f|): large both at init and at the end")
def large_init_large_final(
    initial: torch.Tensor, final: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """min(|w_i|, |w_f|): ranks a weight by its smaller end, so only weights large at both
    ends rank high (Zhou et al. 2019)."""
    wi, wf = _pair(initial, final)
    return torch.minimum(wi.abs(), wf.abs())


@CRITERIA.register("small_init_small_final", "-max(|w_i|, |w_f|): small both at init and at the end")
def small_init_small_final(
    initial: torch.Tensor, final: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """-max(|w_i|, |w_f|): only weights small at both ends rank high (Zhou et al. 2019)."""
    wi, wf = _pair(initial, final)
    return -torch.maximum(wi.abs(), wf.abs())


@CRITERIA.register("magnitude_increase", "|w_f| - |w_i|: keep weights whose magnitude grew most")
def magnitude_increase(
    initial: torch.Tensor, final: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """|w_f| - |w_i|: training's vote for a weight, net of where it started (Zhou et al. 2019)."""
    wi, wf = _pair(initial, final)
    return wf.abs() - wi.abs()


@CRITERIA.register("movement", "|w_f - w_i|: keep weights that moved furthest")
def movement(initial: torch.Tensor, final: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """|w_f - w_i|: distance travelled in training, whatever the direction (Zhou et al. 2019)."""
    wi, wf = _pair(initial, final)
    return (wf - wi).abs()


@CRITERIA.register("random", "uniform noise from the generator (control)")
def random(initial: torch.Tensor, final: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform noise: the control every criterion must beat (Zhou et al. 2019). Drawn on the
    CPU from ``generator`` and moved to ``final``'s device, so it is device-independent."""
    if generator is None:
        raise ConfigError(
            "the 'random' mask criterion needs a torch.Generator; pass generator=torch.Generator().manual_seed(seed)"
        )
    wf = _pair(initial, final)[1]
    return torch.rand(wf.shape, generator=generator).to(wf.device, wf.dtype)


def _prefer(a: torch.Tensor, preferred: torch.Tensor) -> torch.Tensor:
    """``a`` where ``preferred``, ``a - (max(a) + 1)`` elsewhere.

    Finite and order-preserving: with ``a >= 0``, every non-preferred score is <= -1 < 0 and
    every preferred score is ``a`` itself, so preferred positions outrank all others and each
    group is ordered by ``a``. Preferred scores are exactly ``|w_f|`` (comparable across
    layers, as large_final); the offset of the others is per tensor.
    """
    if a.numel() == 0:
        return a.clone()
    offset = a.max() + 1
    return torch.where(preferred, a, a - offset)


@CRITERIA.register("large_final_same_sign", "same-sign weights first, each group by |w_f|")
def large_final_same_sign(
    initial: torch.Tensor, final: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Weights whose sign did not change (``sign(w_i) == sign(w_f)``, both nonzero) score
    ``|w_f|`` and outrank every other weight, which scores ``|w_f| - (max|w_f| + 1)``: the
    best criterion of Zhou et al. (2019), who found that keeping the sign matters most."""
    wi, wf = _pair(initial, final)
    return _prefer(wf.abs(), torch.sign(wi) * torch.sign(wf) > 0)


@CRITERIA.register("large_final_diff_sign", "sign-flipped weights first, each group by |w_f|")
def large_final_diff_sign(
    initial: torch.Tensor, final: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The mirror of large_final_same_sign (a control in Zhou et al. 2019): weights whose sign
    flipped (both nonzero, opposite signs) score ``|w_f|`` and outrank all others (same sign or
    a zero end), which score ``|w_f| - (max|w_f| + 1)``."""
    wi, wf = _pair(initial, final)
    return _prefer(wf.abs(), torch.sign(wi) * torch.sign(wf) < 0)


def criterion_scores(
    name: str,
    initial: Mapping[str, torch.Tensor],
    final: Mapping[str, torch.Tensor],
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Scores of criterion ``name`` for every tensor of ``final`` (in its key order), paired
    with the tensor of the same name in ``initial`` (e.g. a :func:`~secateurs.resets.snapshot`
    taken at initialisation or at the rewind point)."""
    criterion = CRITERIA.get(name)
    out: dict[str, torch.Tensor] = {}
    for layer, wf in final.items():
        if layer not in initial:
            raise ConfigError(
                f"criterion {name!r}: the initial weights have no entry for {layer}; save the initial "
                "weights from the same model (e.g. secateurs.resets.snapshot(model) before training)"
            )
        wi = initial[layer]
        if wi.shape != wf.shape:
            raise ConfigError(
                f"criterion {name!r}: {layer} is {tuple(wi.shape)} in the initial weights but "
                f"{tuple(wf.shape)} now; the initial weights must be saved from the same model"
            )
        out[layer] = criterion(wi, wf, generator)
    return out


def make_score(
    name: str, initial: Mapping[str, torch.Tensor]
) -> Callable[[Mapping[str, torch.Tensor], torch.Generator], dict[str, torch.Tensor]]:
    """A two-argument ``score(weights, generator)`` (the :class:`~secateurs.scores.Score`
    protocol) that scores the current weights as ``w_f`` by criterion ``name`` against
    ``initial``, so a Sparsifier prunes by it (Zhou et al. 2019's IMP with other criteria).

    The name is checked now; ``initial`` is copied now, so later in-place edits of the model
    (e.g. rewinding) cannot change what the score compares against.
    """
    CRITERIA.get(name)
    saved = {n: t.detach().clone() for n, t in initial.items()}

    def score(weights: Mapping[str, torch.Tensor], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return criterion_scores(name, saved, weights, generator)

    score.__name__ = f"criterion_{name}"
    score.__doc__ = f"Mask criterion {name!r} (Zhou et al. 2019) against saved initial weights."
    return score
