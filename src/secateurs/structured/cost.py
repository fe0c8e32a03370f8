"""Parameters and multiply-accumulates of a model for one example input.

Counted like RigL's accounting (Evci et al., 2020, appendix H): conv and linear MACs only;
BN, activations and pooling are a few percent and shrink with the channels anyway.
Forward hooks are used here for measuring only, on a no-grad eval pass, and removed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["Cost", "model_cost"]

_COUNTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class Cost:
    """``parameters``: scalar parameters; ``macs``: multiply-accumulates per example."""

    parameters: int
    macs: int


def _macs(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)


def model_cost(model: nn.Module, example_input: torch.Tensor) -> Cost:
    """Measure MACs with one forward pass (batch on dim 0, result per example)."""
    total = [0]
    handles = [
        m.register_forward_hook(lambda mod, _inp, out: total.__setitem__(0, total[0] + _macs(mod, out)))
        for m in model.modules() if isinstance(m, _COUNTED)
    ]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    params = sum(p.numel() for p in model.parameters())
    return Cost(params, total[0] // max(1, example_input.shape[0]))
