"""VGG-11/16/19 with batch norm, CIFAR variant (Simonyan & Zisserman, 2015).

The 32x32 version used by GraSP (Wang et al., 2020) and GraNet (Liu et al., 2021):
conv3x3-BN-ReLU stacks from configs A/D/E, five max-pools, and one Linear(512, classes)
instead of the 4096-wide ImageNet head.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn as nn

from ._common import MODELS, kaiming_init, require_divisible

_M = "M"  # max-pool marker
CONFIGS: dict[str, list[Union[int, str]]] = {
    "A": [64, _M, 128, _M, 256, 256, _M, 512, 512, _M, 512, 512, _M],
    "D": [64, 64, _M, 128, 128, _M, 256, 256, 256, _M, 512, 512, 512, _M, 512, 512, 512, _M],
    "E": [64, 64, _M, 128, 128, _M, 256, 256, 256, 256, _M,
          512, 512, 512, 512, _M, 512, 512, 512, 512, _M],
}


class VGG(nn.Module):
    """VGG with BN; convs have no bias because the following BN shift makes it redundant."""

    def __init__(
        self,
        config: Sequence[Union[int, str]],
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
    ):
        super().__init__()
        pools = sum(1 for v in config if v == _M)
        side = require_divisible(image_size, pools, "VGG", "resize to 32 (CIFAR)")
        layers: list[nn.Module] = []
        channels = in_channels
        for v in config:
            if v == _M:
                layers.append(nn.MaxPool2d(2))
            else:
                width = int(v)
                layers += [
                    nn.Conv2d(channels, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                channels = width
        self.features = nn.Sequential(*layers)
        # side is 1 for 32x32 inputs -> Linear(512, classes)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * side * side, num_classes)
        )
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _register(name: str, config: str, depth: int) -> None:
    def factory(*, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
        return VGG(CONFIGS[config], num_classes, in_channels, image_size)

    factory.__name__ = name
    MODELS.register(name, f"VGG-{depth}-BN, CIFAR variant (Simonyan & Zisserman, 2015)")(factory)


_register("vgg11", "A", 11)
_register("vgg16", "D", 16)
_register("vgg19", "E", 19)
