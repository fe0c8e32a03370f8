"""Learned supermasks: train a mask over frozen random weights.

A randomly initialised network already contains subnetworks that perform well without any
weight training (Zhou et al. 2019, "Deconstructing Lottery Tickets: Zeros, Signs, and the
Supermask"; Ramanujan et al. 2020, "What's Hidden in a Randomly Weighted Neural Network?").
:class:`Supermask` finds one by learning a real-valued score per weight while the weights
stay frozen:

* ``mode="topk"`` (edge-popup, Ramanujan et al. 2020): each layer keeps exactly its top
  ``keep_count(numel, sparsity)`` scores, the same sparsity in every layer; the gradient
  passes straight through the hard top-k to the scores.
* ``mode="bernoulli"`` (Zhou et al. 2019): in training each weight is kept with probability
  ``sigmoid(score)``, sampled anew every forward; the gradient passes straight through the
  sample to ``sigmoid(score)``. In eval mode the mask is ``sigmoid(score) > 0.5``, so the
  sparsity is *learned*: ``sparsity`` only sets the initial keep probability.

The wrapped model is never modified (no hooks, no parametrizations, no weight writes): the
masked weights are built in :meth:`Supermask.forward` and handed to
:func:`torch.func.functional_call`. Its buffers (batch-norm running statistics) do update in
train mode, which is what one wants: they then describe the masked network.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import torch
from torch import nn
from torch.func import functional_call

from ..allocation import check_sparsity, uniform_keep
from ..errors import CheckpointError, SparsityMismatchError, UnknownNameError
from ..masks import select_prunable, unwrap_model
from ..selection import count, topk_mask
from ..validate import check_int

MODES = ("topk", "bernoulli")
_STATE_FORMAT = "secateurs.supermask/1"
#: Initial keep probabilities for ``bernoulli`` are clamped here: ``logit(1)`` is infinite.
_MIN_P, _MAX_P = 0.01, 0.99


class _StraightThroughTopK(torch.autograd.Function):
    """Hard top-k mask forward, identity backward (edge-popup's straight-through estimator,
    Ramanujan et al. 2020 §3). A custom Function rather than ``m + s - s.detach()`` so the
    forward value is exactly 0/1 and :meth:`Supermask.export` matches it bit for bit."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, k: int) -> torch.Tensor:
        return topk_mask(scores.detach(), k).to(scores.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _StraightThroughSample(torch.autograd.Function):
    """A 0/1 sample given uniform noise, identity backward to the probabilities (Zhou et al.
    2019 §5: Bernoulli masks trained with a straight-through gradient)."""

    @staticmethod
    def forward(ctx: Any, probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (noise < probs).to(probs.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _fan_in(weight: torch.Tensor) -> int:
    """Inputs per output unit: ``in_features`` for Linear, ``in * kh * kw`` for Conv2d."""
    rows = weight.shape[0] if weight.dim() > 1 else 1
    return max(1, weight.numel() // max(1, rows))


def _score_key(name: str) -> str:
    # ParameterDict keys may not contain "."; "/" cannot occur in a parameter name.
    return name.replace(".", "/")


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UnknownNameError(f"unknown supermask mode {mode!r}; known modes: {', '.join(MODES)}")
    return mode


def _check_seed(seed: int) -> int:
    return check_int(seed, "seed", hint="it seeds the score init and mask sampling")


class Supermask(nn.Module):
    """A frozen model whose weights are masked by learned scores (see the module docstring).

    Train it by optimising ``self.scores.parameters()`` (the only parameters that require
    grad). Scores are initialised from a generator seeded with ``seed``, uniform in
    ``±1/sqrt(fan_in)`` (a Kaiming-uniform-like scale, as edge-popup initialises its scores);
    for ``bernoulli`` the same noise is added to ``logit(1 - sparsity)`` (the keep probability
    clamped to [0.01, 0.99]) so the *sampled* masks start near the requested sparsity; the
    eval mask ``sigmoid(s) > 0.5`` then starts nearly all-kept (target < 0.5) or all-removed
    (target > 0.5) and only reaches a useful sparsity once training has moved the scores
    (its learning rate must be large enough for the probabilities to saturate). Bernoulli noise
    is drawn on the CPU from that same generator, whose state is saved in ``state_dict()``:
    a run resumed from a checkpoint samples the same masks on any device.

    ``signed_constant=True`` replaces each weight by ``sign(w) * std(layer)`` before masking:
    Ramanujan et al.'s "signed Kaiming constant", with the layer's actual weight std in place
    of ``sqrt(2 / fan_in)`` (the two agree for a Kaiming-normal model).
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float = 0.5,
        *,
        mode: str = "topk",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        seed: int = 0,
        signed_constant: bool = False,
    ) -> None:
        super().__init__()
        self.mode = _check_mode(mode)
        self.target_sparsity = check_sparsity(sparsity)
        self.seed = _check_seed(seed)
        self.signed_constant = bool(signed_constant)
        self.model = unwrap_model(model)
        weights = select_prunable(self.model, include, exclude)
        self._names = list(weights)
        self._keys = {n: _score_key(n) for n in self._names}
        self._requires_grad = {n: p.requires_grad for n, p in self.model.named_parameters()}
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._keep = uniform_keep({n: w.numel() for n, w in weights.items()}, self.target_sparsity)
        self._std = {n: float(w.detach().float().std()) if w.numel() > 1 else 1.0 for n, w in weights.items()}
        self._generator = torch.Generator().manual_seed(self.seed)
        self.scores = nn.ParameterDict({self._keys[n]: self._init_scores(w) for n, w in weights.items()})

    # -- construction ---------------------------------------------------------------------
    def _init_scores(self, weight: torch.Tensor) -> nn.Parameter:
        """Uniform in ±1/sqrt(fan_in); Bernoulli scores are shifted to the target keep rate."""
        bound = 1.0 / math.sqrt(_fan_in(weight))
        noise = torch.rand(weight.shape, generator=self._generator, dtype=torch.float32)
        scores = (2.0 * noise - 1.0) * bound
        if self.mode == "bernoulli":
            p = min(max(1.0 - self.target_sparsity, _MIN_P), _MAX_P)
            scores = scores + math.log(p / (1.0 - p))
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        return nn.Parameter(scores.to(device=weight.device, dtype=dtype))

    def _weights(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in self._names}

    def _base(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The frozen values the mask multiplies: ``w``, or ``sign(w) * std`` (signed constant)."""
        if self.signed_constant:
            return torch.sign(weight) * self._std[name]
        return weight

    # -- masks ----------------------------------------------------------------------------
    def _soft_mask(self, name: str) -> torch.Tensor:
        """The mask used in a forward pass, differentiable (straight-through) in the scores."""
        scores = self.scores[self._keys[name]]
        if self.mode == "topk":
            return _StraightThroughTopK.apply(scores, self._keep[name])
        probs = torch.sigmoid(scores)
        if not self.training:
            return (probs > 0.5).to(scores.dtype)
        noise = torch.rand(scores.shape, generator=self._generator, dtype=torch.float32)
        return _StraightThroughSample.apply(probs, noise.to(device=scores.device, dtype=probs.dtype))

    @torch.no_grad()
    def masks(self) -> dict[str, torch.Tensor]:
        """The deterministic masks (what eval mode and :meth:`export` use), bool, by name.

        For ``topk`` each layer is checked to hold exactly its planned count; a mismatch
        raises :class:`SparsityMismatchError` (a silent off-by-some misreports sparsity).
        """
        out = {}
        for name in self._names:
            scores = self.scores[self._keys[name]]
            if self.mode == "topk":
                out[name] = topk_mask(scores, self._keep[name])
            else:
                out[name] = torch.sigmoid(scores) > 0.5
        if self.mode == "topk":
            wrong = [
                f"{n}: {count(m)} active, planned {self._keep[n]}"
                for n, m in out.items() if count(m) != self._keep[n]
            ]
            if wrong:
                raise SparsityMismatchError(
                    "supermask holds a different number of weights than planned: " + "; ".join(wrong[:5])
                    + " (this is a bug in the top-k selection; please report it)"
                )
        return out

    def keep_counts(self) -> dict[str, int]:
        """Planned weights kept per layer (``topk``; for ``bernoulli`` only the initial target)."""
        return dict(self._keep)

    def sparsity(self) -> float:
        """Fraction of prunable weights the deterministic masks remove, over all layers."""
        masks = self.masks()
        total = sum(m.numel() for m in masks.values())
        return 1.0 - sum(count(m) for m in masks.values()) / total

    # -- forward / export -----------------------------------------------------------------
    def effective_weights(self) -> dict[str, torch.Tensor]:
        """Masked weights by name, differentiable in the scores (fresh mask samples each call
        in ``bernoulli`` training)."""
        weights = self._weights()
        return {n: self._base(n, w) * self._soft_mask(n).to(w.dtype) for n, w in weights.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.effective_weights(), (x,), strict=False)

    @torch.no_grad()
    def export(self) -> nn.Module:
        """A deep copy of the wrapped model with the masked weights written in.

        Uses the deterministic masks, so its output equals this module's in eval mode; it
        holds no secateurs code and the original ``requires_grad`` flags are restored.
        """
        clone = copy.deepcopy(self.model)
        params = dict(clone.named_parameters())
        masks = self.masks()
        for name, w in self._weights().items():
            params[name].copy_(self._base(name, w) * masks[name].to(w.dtype))
        for name, p in params.items():
            p.requires_grad_(self._requires_grad.get(name, True))
        return clone

    # -- persistence ----------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        """The sampling generator and the config, so a reload resumes the same mask stream."""
        return {
            "format": _STATE_FORMAT,
            "mode": self.mode,
            "sparsity": self.target_sparsity,
            "signed_constant": self.signed_constant,
            "generator": self._generator.get_state(),
        }

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise CheckpointError("not a secateurs supermask state (missing or unknown 'format' tag)")
        mine = (self.mode, self.target_sparsity, self.signed_constant)
        saved = (state["mode"], state["sparsity"], state["signed_constant"])
        if saved != mine:
            raise CheckpointError(
                f"this supermask state was saved with (mode, sparsity, signed_constant)={saved}, "
                f"but this Supermask has {mine}; build it with the saved settings"
            )
        self._generator.set_state(torch.as_tensor(state["generator"], dtype=torch.uint8).cpu())

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, sparsity={self.target_sparsity}, layers={len(self._names)}, "
            f"signed_constant={self.signed_constant}, seed={self.seed}"
        )
