"""Fully connected networks: a generic MLP and LeNet-300-100.

LeNet-300-100 (LeCun et al., 1998) is the MNIST FC benchmark of Han et al. (2015),
SNIP (Lee et al., 2019) and the lottery-ticket paper (Frankle & Carbin, 2019).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError
from ._common import MODELS, glorot_init


class MLP(nn.Module):
    """Flatten -> (Linear -> ReLU) * len(hidden) -> Linear, for any widths."""

    def __init__(self, input_dim: int, hidden: Sequence[int], num_classes: int):
        super().__init__()
        widths = [int(input_dim), *(int(h) for h in hidden)]
        if any(w <= 0 for w in widths) or num_classes <= 0:
            raise ConfigError(
                f"MLP widths must be positive: input_dim={input_dim}, hidden={list(hidden)}, "
                f"num_classes={num_classes}"
            )
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)
        glorot_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@MODELS.register("mlp")
def mlp(*, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """Generic MLP, hidden widths 512-256 (use the MLP class for other widths)."""
    return MLP(in_channels * image_size**2, (512, 256), num_classes)


@MODELS.register("lenet300_100")
def lenet300_100(
    *, num_classes: int = 10, in_channels: int = 1, image_size: int = 28
) -> nn.Module:
    """LeNet-300-100 fully connected net (LeCun et al., 1998)."""
    return MLP(in_channels * image_size**2, (300, 100), num_classes)
