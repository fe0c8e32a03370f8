"""secateurs: pruning, regrowing and growing neural networks in PyTorch.

The library layer (this namespace) needs only torch and numpy. The experiment layer
(:mod:`secateurs.data`, :mod:`secateurs.models`, :mod:`secateurs.train`, the CLI) sits on top.
"""
from .allocation import allocate, check_sparsity, erk_densities, keep_count
from .engine import prune
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    NonFiniteLossError,
    SecateursError,
    SparsityMismatchError,
    UnknownNameError,
)
from .layers import PruningNotice, register_layer
from .masks import Masks, select_prunable
from .methods import METHODS, Magnitude, Random, Sparsifier
from .schedules import Constant, Cubic, Geometric, OneShot

__version__ = "0.1.0"

__all__ = [
    "Masks", "select_prunable", "register_layer", "PruningNotice", "Sparsifier", "Magnitude", "Random", "METHODS",
    "OneShot", "Constant", "Geometric", "Cubic",
    "allocate", "check_sparsity", "erk_densities", "keep_count", "prune",
    "SecateursError", "ConfigError", "UnknownNameError", "SparsityMismatchError",
    "DataError", "CheckpointError", "NonFiniteLossError",
]
