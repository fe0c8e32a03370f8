"""Importance scores: higher means more worth keeping.

A score is a pure function ``score(weights, generator) -> {name: tensor}`` with one tensor per
prunable weight, shaped like it. The generator is passed in (never global) so random scores
are reproducible and checkpointable.
"""
from __future__ import annotations

from typing import Callable, Mapping, Protocol

import torch

from .registry import Registry


class Score(Protocol):
    def __call__(
        self, weights: Mapping[str, torch.Tensor], generator: torch.Generator
    ) -> dict[str, torch.Tensor]: ...


SCORES: Registry[Callable] = Registry("score")


@SCORES.register("magnitude")
def magnitude(weights: Mapping[str, torch.Tensor], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """|w| (Han et al. 2015; Frankle & Carbin 2019): small weights matter least."""
    return {n: w.detach().abs() for n, w in weights.items()}


@SCORES.register("random")
def random(weights: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Uniform noise: the control every criterion must beat (drawn on CPU, so identical on any
    device for a given generator state)."""
    return {
        n: torch.rand(w.shape, generator=generator).to(w.device) for n, w in weights.items()
    }
