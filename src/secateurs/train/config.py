"""Typed, validated training configs.

Configs are frozen so a run's settings cannot drift after the trainer is built, and
they are checked at construction so a bad value fails before any training time is spent.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError, UnknownNameError
from ..typed_config import from_dict
from ..validate import check_bool, check_int, check_number, is_number
from .optim import LR_SCHEDULES, OPTIMIZERS


def _require(ok: bool, message: str) -> None:
    """Raise ConfigError with ``message`` unless ``ok``; keeps the checks one line each."""
    if not ok:
        raise ConfigError(message)


def _check_name(kind: str, registry, name: str) -> None:
    """Unknown names fail here, listing the known ones, not later inside the loop."""
    try:
        registry.get(name)
    except UnknownNameError as err:
        raise UnknownNameError(f"{kind}.name: {err}; set name to one of them") from None


def _coerce(cls, value: Any, owner: str):
    """Accept a plain mapping (from YAML/JSON) for a nested config; unknown keys are errors."""
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return from_dict(cls, value, f"{owner}.")
    raise ConfigError(f"{owner} must be a {cls.__name__} or a mapping, got {type(value).__name__}")


@dataclass(frozen=True)
class OptimizerConfig:
    """Which optimizer and its hyper-parameters (``momentum``/``nesterov`` are SGD-only,
    ``betas`` Adam/AdamW-only)."""

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        _check_name("OptimizerConfig", OPTIMIZERS, self.name)
        check_number(self.lr, "OptimizerConfig.lr", above=0, finite=True, hint="use e.g. lr=0.1 (SGD) or 1e-3 (Adam)")
        check_number(self.momentum, "OptimizerConfig.momentum", minimum=0.0, below=1.0, hint="0.9 is the usual value")
        _require(
            not (self.nesterov and self.name == "sgd" and self.momentum == 0),
            "OptimizerConfig.nesterov=True needs momentum > 0; set momentum (e.g. 0.9) or nesterov=False",
        )
        check_number(self.weight_decay, "OptimizerConfig.weight_decay", minimum=0)
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else self.betas
        _require(
            isinstance(betas, tuple) and len(betas) == 2 and all(is_number(b) and 0.0 <= b < 1.0 for b in betas),
            f"OptimizerConfig.betas must be two numbers in [0, 1), got {self.betas!r}; the default is (0.9, 0.999)",
        )
        object.__setattr__(self, "betas", betas)


@dataclass(frozen=True)
class LRScheduleConfig:
    """Learning-rate schedule, applied per optimizer step; ``milestones`` and
    ``warmup_epochs`` are in epochs (converted to steps by the trainer)."""

    name: str = "constant"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        _check_name("LRScheduleConfig", LR_SCHEDULES, self.name)
        milestones = tuple(self.milestones) if isinstance(self.milestones, (list, tuple)) else self.milestones
        _require(isinstance(milestones, tuple), f"LRScheduleConfig.milestones must be a list of epochs, got {self.milestones!r}")
        for m in milestones:
            check_int(m, "LRScheduleConfig.milestones", minimum=1, hint=f"milestones are epochs, got {self.milestones!r}")
        _require(
            all(a < b for a, b in zip(milestones, milestones[1:])),
            f"LRScheduleConfig.milestones must be strictly increasing, got {milestones}; sort them and drop duplicates",
        )
        _require(
            self.name != "multistep" or len(milestones) > 0,
            "LRScheduleConfig: name='multistep' needs milestones, e.g. milestones=(30, 60)",
        )
        check_number(self.gamma, "LRScheduleConfig.gamma", above=0, hint="0.1 is the usual value")
        check_number(self.warmup_epochs, "LRScheduleConfig.warmup_epochs", minimum=0, finite=True, hint="use 0 for no warm-up")
        check_number(self.min_lr, "LRScheduleConfig.min_lr", minimum=0)
        object.__setattr__(self, "milestones", milestones)


@dataclass(frozen=True)
class TrainConfig:
    """Everything the training loop needs besides the model and the data.

    ``eval_every`` (steps) adds mid-epoch evaluations on the validation and test data, e.g.
    every 100 iterations to find the early-stopping iteration (Frankle & Carbin 2019).

    ``health`` guards against a run that learned nothing yet reports "complete": after the
    first epoch the training loss of its second half must be below chance (the entropy of the
    labels seen), and the final accuracy must beat always predicting the most common class.
    ``"error"`` raises :class:`~secateurs.errors.TrainingHealthError`, ``"mark"`` records the
    verdict in :attr:`Trainer.health` and the epoch record and goes on, ``"off"`` skips it.
    """

    epochs: int
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    grad_clip: float | None = None
    loss_check_every: int = 50
    label_smoothing: float = 0.0
    eval_every: int | None = None
    health: str = "error"

    def __post_init__(self) -> None:
        object.__setattr__(self, "optimizer", _coerce(OptimizerConfig, self.optimizer, "TrainConfig.optimizer"))
        object.__setattr__(self, "lr_schedule", _coerce(LRScheduleConfig, self.lr_schedule, "TrainConfig.lr_schedule"))
        check_int(self.epochs, "TrainConfig.epochs", minimum=0)
        check_int(self.seed, "TrainConfig.seed")
        _require(isinstance(self.device, str), f"TrainConfig.device must be a string, got {self.device!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ConfigError(
                    f"TrainConfig.device {self.device!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
                ) from None
        check_bool(self.amp, "TrainConfig.amp")
        check_number(self.grad_clip, "TrainConfig.grad_clip", above=0, finite=True, optional=True, hint="None is off")
        check_int(self.loss_check_every, "TrainConfig.loss_check_every", minimum=1, hint="50 is a good default")
        check_number(self.label_smoothing, "TrainConfig.label_smoothing", minimum=0.0, below=1.0, hint="0.1 is common, 0 is off")
        check_int(
            self.eval_every, "TrainConfig.eval_every", minimum=1, optional=True,
            hint="steps between evaluations; None evaluates per epoch only",
        )
        _require(
            self.health in ("error", "mark", "off"),
            f"TrainConfig.health must be 'error' (a phase that learns nothing stops), 'mark' (it is recorded in the "
            f"history and training goes on) or 'off', got {self.health!r}",
        )
        _require(
            self.lr_schedule.min_lr <= self.optimizer.lr,
            f"LRScheduleConfig.min_lr ({self.lr_schedule.min_lr}) is above OptimizerConfig.lr ({self.optimizer.lr}); "
            "lower min_lr or raise lr",
        )
