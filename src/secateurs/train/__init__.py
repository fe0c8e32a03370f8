"""Training: configs, optimizers, step-based LR schedules, the loop and atomic checkpoints."""
from .checkpoint import check_model_compatible, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import LRScheduleConfig, OptimizerConfig, TrainConfig
from .loop import BatchSource, SparsifierLike, Trainer, TrainState, evaluate
from .optim import build_lr_schedule, build_optimizer

__all__ = [
    "BatchSource",
    "LRScheduleConfig",
    "OptimizerConfig",
    "SparsifierLike",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "build_lr_schedule",
    "build_optimizer",
    "check_model_compatible",
    "evaluate",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]
