"""CIFAR ResNets of He et al. (2016), Sec. 4.2: ResNet-20/32/56/110.

Three stages of 16/32/64 channels with n = (depth - 2) / 6 basic blocks each. Shortcut
option A (parameter-free) is the paper's CIFAR choice and the one pruning papers compare
on; option B (1x1 conv + BN projection) is available for ablations.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ._common import MODELS, kaiming_init
from .blocks import BasicBlock, projection


class PadShortcut(nn.Module):
    """Option A: stride-2 subsampling plus zero channels, so the shortcut has no weights."""

    def __init__(self, stride: int, extra_channels: int):
        super().__init__()
        self.stride = stride
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


def cifar_shortcut(in_planes: int, planes: int, stride: int, kind: str) -> nn.Module:
    """Option A (zero-pad, no weights) or B (1x1 projection) where the shape changes."""
    if kind == "A" and (stride != 1 or in_planes != planes):
        return PadShortcut(stride, planes - in_planes)
    return projection(in_planes, planes, stride)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; global average pooling makes the head size-free."""

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        shortcut: str = "A",
    ):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, 110), got {depth}")
        if shortcut not in ("A", "B"):
            raise ConfigError(
                f"shortcut must be 'A' (zero-pad) or 'B' (1x1 conv), got {shortcut!r}"
            )
        if image_size < 8:
            raise ConfigError(
                f"CIFAR ResNet downsamples 4x, so image_size must be >= 8, got {image_size}; "
                f"use 32 (CIFAR)"
            )
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages: list[nn.Module] = []
        in_planes = 16
        for i, planes in enumerate((16, 32, 64)):
            blocks: list[nn.Module] = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride, cifar_shortcut(in_planes, planes, stride, shortcut)))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        kaiming_init(self, mode="fan_in")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def _register(depth: int) -> None:
    def factory(*, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
        return CifarResNet(depth, num_classes, in_channels, image_size)

    factory.__name__ = f"resnet{depth}"
    description = f"ResNet-{depth} for CIFAR, option-A shortcuts (He et al., 2016)"
    MODELS.register(f"resnet{depth}", description)(factory)


for _depth in (20, 32, 56, 110):
    _register(_depth)
