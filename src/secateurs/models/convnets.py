"""Conv-2 / Conv-4 / Conv-6 of the lottery-ticket paper (Frankle & Carbin, 2019, Table 1).

Scaled-down VGG-style nets for CIFAR-10: pairs of 3x3 convs (padding 1) each followed by
a 2x2 max-pool, then FC 256-256-num_classes. No batch norm, as in the paper.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ._common import MODELS, glorot_init, require_divisible

_WIDTHS: dict[int, tuple[int, ...]] = {2: (64,), 4: (64, 128), 6: (64, 128, 256)}


class ConvNet(nn.Module):
    """Blocks of [conv3x3-ReLU, conv3x3-ReLU, maxpool2], one per entry of ``widths``."""

    def __init__(
        self,
        widths: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        fc: Sequence[int] = (256, 256),
    ):
        super().__init__()
        side = require_divisible(image_size, len(widths), f"Conv-{2 * len(widths)}", "resize to e.g. 32")
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            for _ in range(2):
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = [nn.Flatten()]
        fan_in = channels * side * side
        for width in fc:
            head += [nn.Linear(fan_in, width), nn.ReLU(inplace=True)]
            fan_in = width
        head.append(nn.Linear(fan_in, num_classes))
        self.classifier = nn.Sequential(*head)
        glorot_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _register(depth: int) -> None:
    def factory(*, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
        return ConvNet(_WIDTHS[depth], num_classes, in_channels, image_size)

    factory.__name__ = f"conv{depth}"
    MODELS.register(f"conv{depth}", f"Conv-{depth} CIFAR net (Frankle & Carbin, 2019)")(factory)


for _depth in _WIDTHS:
    _register(_depth)
