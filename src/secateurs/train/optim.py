"""Optimizers and step-based learning-rate schedules built from configs.

Schedules are a single :class:`~torch.optim.lr_scheduler.LambdaLR` stepped once per
optimizer step, so warm-up and decay are smooth within an epoch and the whole schedule
state is one integer (``last_epoch``) that checkpoints round-trip exactly.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ..errors import ConfigError
from ..registry import Registry
from ..validate import check_int

if TYPE_CHECKING:
    from .config import LRScheduleConfig, OptimizerConfig

OptimizerFactory = Callable[[list, "OptimizerConfig"], torch.optim.Optimizer]
# (cfg, steps_per_epoch, epochs, base_lr) -> step -> decay factor (warm-up applied on top)
DecayFactory = Callable[["LRScheduleConfig", int, int, float], Callable[[int], float]]

OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")
LR_SCHEDULES: Registry[DecayFactory] = Registry("lr schedule")


@OPTIMIZERS.register("sgd", "SGD with (optionally Nesterov) momentum and L2 weight decay")
def _sgd(params: list, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay, foreach=True,
    )


@OPTIMIZERS.register("adam", "Adam with L2 weight decay added to the gradient")
def _adam(params: list, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=True)


@OPTIMIZERS.register("adamw", "Adam with decoupled weight decay")
def _adamw(params: list, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=True)


def build_optimizer(params_or_model: nn.Module | Iterable, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """Optimizer over a model's trainable parameters (or given params / param groups)."""
    if isinstance(params_or_model, nn.Module):
        params = [p for p in params_or_model.parameters() if p.requires_grad]
    else:
        params = list(params_or_model)
    if not params:
        raise ConfigError("build_optimizer: no trainable parameters; check requires_grad on the model")
    return OPTIMIZERS.get(cfg.name)(params, cfg)


@LR_SCHEDULES.register("constant", "the base learning rate throughout")
def _constant(cfg: LRScheduleConfig, steps_per_epoch: int, epochs: int, base_lr: float) -> Callable[[int], float]:
    return lambda step: 1.0


@LR_SCHEDULES.register("multistep", "multiply by gamma at each milestone epoch")
def _multistep(cfg: LRScheduleConfig, steps_per_epoch: int, epochs: int, base_lr: float) -> Callable[[int], float]:
    drops = [m * steps_per_epoch for m in cfg.milestones]
    gamma = cfg.gamma
    return lambda step: gamma ** sum(step >= d for d in drops)


@LR_SCHEDULES.register("cosine", "cosine decay from lr to min_lr over the steps after warm-up")
def _cosine(cfg: LRScheduleConfig, steps_per_epoch: int, epochs: int, base_lr: float) -> Callable[[int], float]:
    start = _warmup_steps(cfg, steps_per_epoch)
    span = max(1, epochs * steps_per_epoch - start)
    floor = min(1.0, cfg.min_lr / base_lr) if base_lr > 0 else 0.0

    def factor(step: int) -> float:
        progress = min(1.0, max(0.0, (step - start) / span))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@LR_SCHEDULES.register("linear", "linear decay from lr to min_lr over the steps after warm-up")
def _linear(cfg: LRScheduleConfig, steps_per_epoch: int, epochs: int, base_lr: float) -> Callable[[int], float]:
    """Linear decay to ``min_lr``: the retraining schedule that makes pruned networks recover
    fastest in the IMP revisits (Zimmer et al. 2023, "How I learned to stop worrying and love
    retraining")."""
    start = _warmup_steps(cfg, steps_per_epoch)
    span = max(1, epochs * steps_per_epoch - start)
    floor = min(1.0, cfg.min_lr / base_lr) if base_lr > 0 else 0.0
    return lambda step: floor + (1.0 - floor) * (1.0 - min(1.0, max(0.0, (step - start) / span)))


def _warmup_steps(cfg: LRScheduleConfig, steps_per_epoch: int) -> int:
    return int(round(cfg.warmup_epochs * steps_per_epoch))


def _with_warmup(decay: Callable[[int], float], warmup: int) -> Callable[[int], float]:
    """Linear ramp lr/warmup, 2*lr/warmup, ..., lr over the first ``warmup`` steps."""
    if warmup <= 0:
        return decay
    return lambda step: decay(step) * min(1.0, (step + 1) / warmup)


def build_lr_schedule(
    optimizer: torch.optim.Optimizer, cfg: LRScheduleConfig, steps_per_epoch: int, epochs: int
) -> LambdaLR:
    """A LambdaLR to be stepped after every optimizer step (not every epoch).

    The factors are closures, not saved in its state_dict, so a resumed run takes them
    from its own config (e.g. a longer ``epochs``) and only the step count from the file.
    """
    check_int(steps_per_epoch, "build_lr_schedule: steps_per_epoch", minimum=1, hint="is the training data empty?")
    check_int(epochs, "build_lr_schedule: epochs", minimum=0)
    make_decay = LR_SCHEDULES.get(cfg.name)
    warmup = _warmup_steps(cfg, steps_per_epoch)
    lambdas = [
        _with_warmup(make_decay(cfg, steps_per_epoch, epochs, group["lr"]), warmup)
        for group in optimizer.param_groups
    ]
    return LambdaLR(optimizer, lambdas)
