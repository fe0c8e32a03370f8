"""Typed, validated training configs.

Configs are frozen so a run's settings cannot drift after the trainer is built, and
they are checked at construction so a bad value fails before any training time is spent.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError, UnknownNameError
from ..typed_config import from_dict
from .optim import LR_SCHEDULES, OPTIMIZERS


def _require(ok: bool, message: str) -> None:
    """Raise ConfigError with ``message`` unless ``ok``; keeps the checks one line each."""
    if not ok:
        raise ConfigError(message)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
        _require(
            _is_number(self.lr) and math.isfinite(self.lr) and self.lr > 0,
            f"OptimizerConfig.lr must be a finite number > 0, got {self.lr!r}; use e.g. lr=0.1 (SGD) or 1e-3 (Adam)",
        )
        _require(
            _is_number(self.momentum) and 0.0 <= self.momentum < 1.0,
            f"OptimizerConfig.momentum must be in [0, 1), got {self.momentum!r}; 0.9 is the usual value",
        )
        _require(
            not (self.nesterov and self.name == "sgd" and self.momentum == 0),
            "OptimizerConfig.nesterov=True needs momentum > 0; set momentum (e.g. 0.9) or nesterov=False",
        )
        _require(
            _is_number(self.weight_decay) and self.weight_decay >= 0,
            f"OptimizerConfig.weight_decay must be >= 0, got {self.weight_decay!r}",
        )
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else self.betas
        _require(
            isinstance(betas, tuple) and len(betas) == 2 and all(_is_number(b) and 0.0 <= b < 1.0 for b in betas),
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
        _require(
            isinstance(milestones, tuple) and all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in milestones),
            f"LRScheduleConfig.milestones must be positive integer epochs, got {self.milestones!r}",
        )
        _require(
            all(a < b for a, b in zip(milestones, milestones[1:])),
            f"LRScheduleConfig.milestones must be strictly increasing, got {milestones}; sort them and drop duplicates",
        )
        _require(
            self.name != "multistep" or len(milestones) > 0,
            "LRScheduleConfig: name='multistep' needs milestones, e.g. milestones=(30, 60)",
        )
        _require(
            _is_number(self.gamma) and self.gamma > 0,
            f"LRScheduleConfig.gamma must be > 0, got {self.gamma!r}; 0.1 is the usual value",
        )
        _require(
            _is_number(self.warmup_epochs) and math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0,
            f"LRScheduleConfig.warmup_epochs must be >= 0, got {self.warmup_epochs!r}; use 0 for no warm-up",
        )
        _require(
            _is_number(self.min_lr) and self.min_lr >= 0,
            f"LRScheduleConfig.min_lr must be >= 0, got {self.min_lr!r}",
        )
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
        _require(
            isinstance(self.epochs, int) and not isinstance(self.epochs, bool) and self.epochs >= 0,
            f"TrainConfig.epochs must be an integer >= 0, got {self.epochs!r}",
        )
        _require(
            isinstance(self.seed, int) and not isinstance(self.seed, bool),
            f"TrainConfig.seed must be an integer, got {self.seed!r}",
        )
        _require(isinstance(self.device, str), f"TrainConfig.device must be a string, got {self.device!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ConfigError(
                    f"TrainConfig.device {self.device!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
                ) from None
        _require(isinstance(self.amp, bool), f"TrainConfig.amp must be True or False, got {self.amp!r}")
        _require(
            self.grad_clip is None or (_is_number(self.grad_clip) and math.isfinite(self.grad_clip) and self.grad_clip > 0),
            f"TrainConfig.grad_clip must be None (off) or a number > 0, got {self.grad_clip!r}",
        )
        _require(
            isinstance(self.loss_check_every, int) and not isinstance(self.loss_check_every, bool) and self.loss_check_every >= 1,
            f"TrainConfig.loss_check_every must be an integer >= 1, got {self.loss_check_every!r}; 50 is a good default",
        )
        _require(
            _is_number(self.label_smoothing) and 0.0 <= self.label_smoothing < 1.0,
            f"TrainConfig.label_smoothing must be in [0, 1), got {self.label_smoothing!r}; 0.1 is common, 0 is off",
        )
        _require(
            self.eval_every is None
            or (isinstance(self.eval_every, int) and not isinstance(self.eval_every, bool) and self.eval_every >= 1),
            f"TrainConfig.eval_every must be None (evaluate per epoch only) or an integer >= 1 (steps), got {self.eval_every!r}",
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
