"""Magnitude and random pruning: the two baselines every paper compares against."""
from __future__ import annotations

from ..scores import magnitude, random
from .base import Sparsifier
from .registry import METHODS


@METHODS.register("magnitude", "prune smallest |w| (global, uniform, ERK or ER allocation)")
class Magnitude(Sparsifier):
    """Magnitude pruning (Han et al. 2015): remove the smallest |w|.

    ``scope="global"`` ranks all layers together (Frankle & Carbin 2019; Blalock et al. 2020),
    ``"uniform"`` prunes each layer to the same sparsity.
    """

    def __init__(self, model, optimizer=None, **kwargs):
        super().__init__(model, optimizer, score=magnitude, **kwargs)


@METHODS.register("random", "prune uniformly at random (seeded), the control baseline")
class Random(Sparsifier):
    """Random pruning (Liu et al. 2022, "The unreasonable effectiveness of random pruning"):
    with ``scope="erk"`` a strong baseline at high sparsity."""

    def __init__(self, model, optimizer=None, **kwargs):
        super().__init__(model, optimizer, score=random, **kwargs)
