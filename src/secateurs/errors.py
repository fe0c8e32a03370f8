"""Exceptions with one clear message: what is wrong and how to fix it.

All derive from :class:`SecateursError` so a CLI can print them without a traceback.
"""


class SecateursError(Exception):
    """Base class of every error secateurs raises on bad input or state."""


class ConfigError(SecateursError, ValueError):
    """A bad argument or configuration value (sparsity out of range, unknown key, ...)."""


class UnknownNameError(ConfigError):
    """A method / model / dataset / option name that is not registered."""


class SparsityMismatchError(SecateursError, RuntimeError):
    """The masks after an update do not hold exactly the planned number of weights."""


class DataError(SecateursError, OSError):
    """Dataset files missing, truncated or malformed."""


class CheckpointError(SecateursError, RuntimeError):
    """A checkpoint that is corrupted, from another model, or from another config."""


class NonFiniteLossError(SecateursError, FloatingPointError):
    """Training produced a NaN or infinite loss."""


class GrowthError(SecateursError, RuntimeError):
    """Growing a layer changed what the network computes (it must not)."""


class UsageWarning(UserWarning):
    """An API call that runs but is almost certainly not what was meant (e.g. ``step()`` on a
    sparsifier that has not pruned yet, so the model trains dense)."""


class TrainingHealthError(SecateursError, RuntimeError):
    """A training phase learned nothing: its loss never fell below chance, or its accuracy
    ended no better than always predicting the most common class."""
