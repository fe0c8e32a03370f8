"""N:M sparsity as a method: prune to n of every m inputs by magnitude, fine-tune with the
pattern fixed (Mishra et al. 2021). The pattern itself lives in :mod:`secateurs.granularity`."""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from ..errors import ConfigError
from ..granularity import check_nm_config, nm_compatible, nm_mask
from ..layers import notice
from ..scores import magnitude
from ..selection import count
from ..validate import check_int
from .base import ScoreFn, Sparsifier
from .registry import METHODS

_NOT_FOR_NM = ("schedule", "swap_schedule", "regrowth", "initial_sparsity", "layer_sparsity")


@METHODS.register("nm", "N:M structured sparsity by magnitude, n of every m inputs (2:4: Mishra et al. 2021)")
class NMSparsifier(Sparsifier):
    """Prune every prunable layer to N:M by magnitude, then fine-tune with the pattern fixed.

    This is Mishra et al. 2021's recipe (train dense, prune 2:4 by magnitude, retrain with the
    mask): :meth:`prune` sets the masks and :meth:`step`, called after ``optimizer.step()``,
    keeps pruned weights, their gradients and optimizer state at zero. Each covered layer ends
    up exactly ``1 - n/m`` sparse; layers in ``keep_dense`` stay dense, and so do layers whose
    inputs per output are not divisible by ``m`` (listed in one :class:`PruningNotice` and in
    ``left_dense``).

    ``recompute_every=k > 0`` re-selects the masks by magnitude every ``k`` steps, from the
    weights as ``optimizer.step()`` left them, i.e. *before* this step's re-zeroing: a pruned
    weight then holds one step of its dense update (its gradient passes straight through the
    mask, as in SR-STE, Zhou et al. 2021) and comes back if that makes it larger than a
    kept weight of its group. It keeps that value and optimizer state; the weights it displaces
    are zeroed. SR-STE's extra decay of pruned weights is not applied: in the shared sparsity
    state pruned weights are zero between steps anyway. Each mask update is recorded with its
    flip rate (the fraction of mask entries that changed, which Zhou et al. 2021 use to study
    how stable N:M masks are during training).
    Calling :meth:`prune` at initialisation and training with ``recompute_every=1`` is this
    library's form of N:M training from scratch.
    """

    timing = "after"
    _plan_fields = ("n", "m", "recompute_every")

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        n: int = 2,
        m: int = 4,
        recompute_every: int = 0,
        sparsity: float | None = None,
        scope: str = "uniform",
        score: ScoreFn = magnitude,
        **kwargs,
    ):
        check_nm_config(n, m)
        check_int(recompute_every, "recompute_every", minimum=0, hint="steps between mask updates; 0 fixes the masks after prune")
        target = 1.0 - n / m
        self._check_sparsity(sparsity, target, n, m)
        if scope != "uniform":
            raise ConfigError(
                f"N:M sparsity is the same in every group, so scope {scope!r} does not apply; leave scope out"
            )
        given = sorted(k for k in _NOT_FOR_NM if kwargs.get(k))
        if given:
            raise ConfigError(
                f"{', '.join(given)} do not apply to N:M sparsity (every covered layer is exactly 1 - n/m "
                "sparse); keep a layer dense with keep_dense=[...] or leave it out with exclude=[...]"
            )
        super().__init__(model, optimizer, score=score, sparsity=target, scope="uniform", **kwargs)
        self.n, self.m, self.recompute_every = n, m, recompute_every
        self._keep_misfits_dense()
        self.covered = [k for k in self.masks.names() if k not in self.fixed_sparsity]
        if not self.covered:
            raise ConfigError("keep_dense covers every prunable layer, so N:M has nothing to prune; narrow keep_dense")
        self._nm_set = False

    @staticmethod
    def _check_sparsity(sparsity: float | None, target: float, n: int, m: int) -> None:
        if sparsity is not None and not math.isclose(sparsity, target, abs_tol=1e-9):
            raise ConfigError(
                f"{n}:{m} sparsity is 1 - {n}/{m} = {target:g}, not {sparsity!r}; "
                "choose n and m instead of a sparsity (or leave sparsity out)"
            )

    def _keep_misfits_dense(self) -> None:
        """Layers whose inputs per output do not split into groups of ``m`` stay dense, listed
        in one notice (as NVIDIA's ASP does), instead of refusing the whole model. A weight
        chosen by ``include`` from a module that is not a registered layer has no known input
        axis: that is an error naming the module type and how to register it."""
        unknown = [k for k, axis in self.masks.output_axes.items() if axis is None and k not in self.fixed_sparsity]
        if unknown:
            raise ConfigError(
                f"N:M groups run along a layer's inputs, but {unknown[0]} is not the weight of a registered "
                "layer type, so its input axis is unknown; register its module type with "
                "secateurs.register_layer(<class>, output_axis=...) or leave it out (exclude=[...])"
            )
        misfits = {
            k: tuple(self.masks.params[k].shape)
            for k in self.masks.names()
            if k not in self.fixed_sparsity
            and not nm_compatible(self.masks.params[k].shape, self.m, self.masks.output_axes[k])
        }
        if misfits:
            self.fixed_sparsity.update(dict.fromkeys(misfits, 0.0))
            shown = ", ".join(f"{k} {s}" for k, s in list(misfits.items())[:6])
            notice(
                f"{self.n}:{self.m} left {len(misfits)} layer(s) dense because their inputs per output are not "
                f"divisible by m={self.m}: {shown}{' ...' if len(misfits) > 6 else ''}"
            )
        self.left_dense = list(misfits)

    @torch.no_grad()
    def prune(self, sparsity: float | None = None) -> dict:
        """Set N:M masks by the score (magnitude) on the covered layers and return the mask
        stats. ``sparsity``, if given, must be ``1 - n/m``. Already pruned weights are chosen
        last: only a group left with fewer than ``n`` active weights takes back zeroed ones."""
        self._refuse_if_closed("prune()")
        self._check_sparsity(sparsity, self.target, self.n, self.m)
        self._set_masks("prune", prefer_active=True)
        return self.masks.stats()

    def step(self) -> None:
        """Call after every ``optimizer.step()``: re-zero pruned weights and state, and every
        ``recompute_every`` steps (once pruned) re-select the N:M masks first."""
        if self._step_check:
            self._check_step()
        upcoming = self.steps + 1
        if self.recompute_every and self._nm_set and upcoming % self.recompute_every == 0:
            self.steps = upcoming
            with torch.no_grad():
                self._set_masks("recompute", prefer_active=False)
            return
        super().step()

    def _set_masks(self, kind: str, prefer_active: bool) -> None:
        old = self.masks.masks
        scores = self.score(self.masks.weights(), self.generator)
        new, expected = {}, {}
        for k, mask in old.items():
            if k in self.covered:
                s = scores[k].detach().float()
                new[k] = nm_mask(s.masked_fill(~mask, -math.inf) if prefer_active else s, self.n, self.m, name=k,
                                 output_axis=self.masks.output_axes[k])
                expected[k] = mask.numel() // self.m * self.n
            else:
                new[k], expected[k] = mask.clone(), count(mask)
        flips = int(torch.stack([torch.count_nonzero(new[k] ^ old[k]).cpu() for k in self.covered]).sum())
        total = sum(old[k].numel() for k in self.covered)
        self.masks.update_(new, expected)  # raises unless every layer holds exactly its plan
        self.masks.sync_()
        self.masks.enforce_(self.optimizer)
        self._nm_set = True
        self._record(kind, self.target, n=self.n, m=self.m, layers=list(self.covered), flip_rate=flips / total)

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        self._nm_set = any(h.get("kind") in ("prune", "recompute") for h in self.history)


# -- export ---------------------------------------------------------------------------------
