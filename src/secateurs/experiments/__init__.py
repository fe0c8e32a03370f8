"""Experiments: declarative configs, run directories, and procedures built on the trainer."""
from .config import DataConfig, ExperimentConfig, ModelConfig, PhaseConfig, PruneConfig, load_config
from .runs import RunDir

__all__ = ["ExperimentConfig", "DataConfig", "ModelConfig", "PhaseConfig", "PruneConfig", "load_config", "RunDir"]
