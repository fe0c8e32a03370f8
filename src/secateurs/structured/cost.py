"""Parameters and multiply-accumulates of a model for one example input.

MACs are :func:`secateurs.analysis.flops.layer_macs` summed over every conv and linear layer
(RigL's accounting, Evci et al. 2020, appendix H): BN, activations and pooling are a few
percent and shrink with the channels anyway.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..analysis.flops import layer_macs

__all__ = ["Cost", "model_cost"]


@dataclass(frozen=True)
class Cost:
    """``parameters``: scalar parameters; ``macs``: multiply-accumulates per example."""

    parameters: int
    macs: int


def model_cost(model: nn.Module, example_input: torch.Tensor) -> Cost:
    """Measure MACs with one forward pass (batch on dim 0, result per example)."""
    macs = sum(layer_macs(model, example_input).values())
    return Cost(sum(p.numel() for p in model.parameters()), macs)
