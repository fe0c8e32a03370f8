"""Selective network linearization: learn which ReLUs to replace by the identity.

In private inference (secure two-party computation) a ReLU costs orders of magnitude more
than a multiply-add, so the cost of a network is its count of ReLU *positions* per sample.
SNL (Cho et al. 2022, "Selective Network Linearization for Efficient Private Inference",
ICML) gives every position its own mask value ``alpha`` and trains

    y = alpha * relu(x) + (1 - alpha) * x,      loss = CE + lambda * ||alpha||_1

together with the weights, raising lambda while the count of alphas above a threshold
stops falling, until at most the budget of ReLUs are alive. The alphas are then binarized
to exactly ``budget`` kept ReLUs and the weights are fine-tuned with that mask fixed.

The pieces here are loop-agnostic: :class:`MaskedReLU` (the module), :func:`linearizable`
(swap a model's ``nn.ReLU`` modules for it), :func:`lasso_penalty`, :func:`relu_count`,
:func:`binarize` and :class:`LassoSchedule` (lambda's schedule, with a state dict). The
training loop is the user's (``secateurs.experiments.linearize`` runs it on the Trainer).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .errors import CheckpointError, ConfigError, SparsityMismatchError
from .validate import check_int

__all__ = [
    "MaskedReLU", "linearizable", "masked_relus", "alpha_parameters", "lasso_penalty", "clamp_alphas_",
    "relu_count", "binarize", "LassoSchedule",
]

MODES = ("soft", "hard")


class MaskedReLU(nn.Module):
    """A ReLU whose every position (per sample: ``C, H, W`` or ``F``) may become linear.

    ``soft`` mode: ``alpha * relu(x) + (1 - alpha) * x`` with a trainable ``alpha``
    (1: the ReLU, 0: the identity, exactly). ``hard`` mode: ``relu(x)`` where the bool
    buffer ``keep`` is True, ``x`` elsewhere, and ``alpha`` is frozen. The mode travels in
    the state dict (extra state), so loading a binarized state makes a module hard.
    """

    def __init__(self, shape: Sequence[int], *, device=None, dtype=None):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if not shape or any(s < 1 for s in shape):
            raise ConfigError(f"MaskedReLU needs the per-sample activation shape (e.g. (C, H, W)), got {shape}")
        self.alpha = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
        self.register_buffer("keep", torch.ones(shape, dtype=torch.bool, device=device))
        self.mode = "soft"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x - a * min(x, 0) is a*relu(x) + (1-a)*x in two ops, exact at a = 0 and a = 1
        if self.mode == "hard":
            return torch.where(self.keep, x.clamp(min=0), x)
        return x - self.alpha * x.clamp(max=0)

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ConfigError(f"unknown MaskedReLU mode {mode!r}; known modes: {', '.join(MODES)}")
        self.mode = mode
        self.alpha.requires_grad_(mode == "soft")  # a hard mask is fixed: optimizers skip alpha

    def get_extra_state(self) -> dict:
        return {"mode": self.mode}

    def set_extra_state(self, state: dict) -> None:
        self.set_mode(state["mode"])

    def extra_repr(self) -> str:
        return f"shape={tuple(self.alpha.shape)}, mode={self.mode}"


def masked_relus(model: nn.Module) -> dict[str, MaskedReLU]:
    """The model's :class:`MaskedReLU` modules by name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MaskedReLU)}


def linearizable(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Replace every ``nn.ReLU`` module of ``model`` (in place) by a soft :class:`MaskedReLU`
    with all alphas 1, so the model computes exactly what it did; returns the ReLU positions
    per sample of each replaced module.

    ``example_input`` (a batch, any size) is run once in eval mode to learn each
    activation's shape. A ReLU module applied twice per forward (e.g. a residual block's
    shared ``self.relu``) cannot carry one mask per position and is refused.
    """
    relus = {name: m for name, m in model.named_modules() if type(m) is nn.ReLU}
    if not relus:
        if masked_relus(model):
            raise ConfigError("the model is already linearizable (it holds MaskedReLU modules); call linearizable once")
        raise ConfigError(
            "the model has no nn.ReLU modules; a functional relu (F.relu / torch.relu in forward) cannot be "
            "masked: use nn.ReLU modules, one per activation"
        )
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in relus}

    def record(name):
        return lambda module, inputs, output: seen[name].append(output)

    handles = [m.register_forward_hook(record(name)) for name, m in relus.items()]
    was_training = model.training
    model.eval()  # batch-norm statistics must not see the probe
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    masked = {}
    for name, outputs in seen.items():
        if len(outputs) != 1:
            raise ConfigError(
                f"nn.ReLU {name!r} ran {len(outputs)} times in one forward pass; give every activation its own "
                "nn.ReLU module (and make sure each runs on the example input)"
            )
        out = outputs[0]
        if out.dim() < 2:
            raise ConfigError(f"example_input must be a batch (N, ...); {name!r} produced shape {tuple(out.shape)}")
        masked[name] = MaskedReLU(out.shape[1:], device=out.device, dtype=out.dtype)
    for name, module in masked.items():  # swapped only once every check has passed
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
    return {name: m.alpha.numel() for name, m in masked.items()}


def alpha_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable alphas (soft modules), for their own optimizer or param group."""
    return [m.alpha for m in masked_relus(model).values() if m.mode == "soft"]


def lasso_penalty(model: nn.Module) -> torch.Tensor:
    """``||alpha||_1`` over every soft module: SNL's sparsity term (Cho et al. 2022)."""
    alphas = alpha_parameters(model)
    if not alphas:
        raise ConfigError("the model has no soft MaskedReLU modules; call linearizable(model, example) first")
    return torch.stack([a.abs().sum() for a in alphas]).sum()


@torch.no_grad()
def clamp_alphas_(model: nn.Module) -> None:
    """Keep alphas in [0, 1] after an optimizer step: each stays an interpolation between
    the ReLU and the identity, and the L1 pull stops at exactly 0 (exactly linear)."""
    for a in alpha_parameters(model):
        a.clamp_(0.0, 1.0)


def relu_count(model: nn.Module, threshold: float = 0.0) -> tuple[int, dict[str, int]]:
    """ReLUs per sample, in total and per module: in hard mode the kept positions, in soft
    mode the positions whose alpha exceeds ``threshold`` (SNL counts alpha > 1e-2)."""
    modules = masked_relus(model)
    if not modules:
        raise ConfigError("the model has no MaskedReLU modules; call linearizable(model, example) first")
    layers = {
        name: int(torch.count_nonzero(m.keep if m.mode == "hard" else m.alpha.detach() > threshold))
        for name, m in modules.items()
    }
    return sum(layers.values()), layers


@torch.no_grad()
def binarize(model: nn.Module, budget: int) -> dict[str, int]:
    """Keep exactly ``budget`` ReLUs, those with the largest alphas over all modules (ties
    go to the earlier module, then the lower flat index), make every module hard and
    freeze the alphas; returns the kept count per module."""
    modules = masked_relus(model)
    if not modules:
        raise ConfigError("the model has no MaskedReLU modules; call linearizable(model, example) first")
    total = sum(m.alpha.numel() for m in modules.values())
    check_int(budget, "budget", hint="a count of ReLUs to keep; round it first")
    if not 0 <= budget <= total:
        raise ConfigError(f"budget {budget} is outside [0, {total}], the model's ReLU positions per sample")
    flat = torch.cat([m.alpha.detach().reshape(-1).float() for m in modules.values()])
    if not torch.isfinite(flat).all():
        raise ConfigError("alphas contain NaN or inf; the linearization diverged, lower the alpha learning rate")
    order = torch.sort(flat.cpu(), descending=True, stable=True).indices  # stable: ties by index
    keep = torch.zeros(total, dtype=torch.bool)
    keep[order[:budget]] = True
    start = 0
    for m in modules.values():
        n = m.alpha.numel()
        m.keep.copy_(keep[start:start + n].view_as(m.keep))
        m.set_mode("hard")
        start += n
    kept, layers = relu_count(model)
    if kept != budget:
        raise SparsityMismatchError(f"binarize kept {kept} ReLUs instead of the budget {budget}")
    return layers


@dataclass
class LassoSchedule:
    """SNL's lambda (Cho et al. 2022): at each check, if the count of ReLUs alive
    has not fallen by at least ``min_decrease`` (relative) since the previous check, lambda
    is multiplied by ``growth``; the search is done once the count is within ``budget``.
    Starting small and growing keeps the L1 term from linearizing everything at once."""

    budget: int
    lasso: float
    growth: float = 1.1
    min_decrease: float = 0.0
    previous: int | None = None
    checks: int = 0

    def __post_init__(self) -> None:
        check_int(self.budget, "LassoSchedule.budget", minimum=0, hint="the number of ReLUs kept")
        if not (isinstance(self.lasso, (int, float)) and math.isfinite(self.lasso) and self.lasso > 0):
            raise ConfigError(f"LassoSchedule.lasso (the initial lambda) must be a finite number > 0, got {self.lasso!r}")
        if not (isinstance(self.growth, (int, float)) and math.isfinite(self.growth) and self.growth >= 1):
            raise ConfigError(f"LassoSchedule.growth must be a number >= 1 (1: lambda fixed), got {self.growth!r}")
        if not (isinstance(self.min_decrease, (int, float)) and 0 <= self.min_decrease < 1):
            raise ConfigError(f"LassoSchedule.min_decrease must be in [0, 1), got {self.min_decrease!r}")

    def update(self, count: int) -> bool:
        """Take the current count of ReLUs alive; returns whether the budget is met."""
        self.checks += 1
        if count <= self.budget:
            self.previous = count
            return True
        if self.previous is not None and count > self.previous * (1.0 - self.min_decrease):
            self.lasso *= self.growth
        self.previous = count
        return False

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        fields = {f.name for f in dataclasses.fields(self)}
        if set(state) != fields:
            raise CheckpointError(f"LassoSchedule state needs keys {sorted(fields)}, got {sorted(state)}")
        for key, value in state.items():
            setattr(self, key, value)
