"""ImageNet ResNet-18 and ResNet-50 (He et al., 2016), "v1.5" layout.

v1.5 puts the bottleneck's stride on the 3x3 conv rather than the first 1x1 (as
torchvision does); it is the variant pruning papers report on. Adaptive average pooling
lets the same weights run on any input of at least 32x32.
"""
from __future__ import annotations

from typing import Sequence, Type, Union

import torch
import torch.nn as nn

from ..errors import ConfigError
from ._common import MODELS, kaiming_init
from .blocks import BasicBlock, projection


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand x4; used by ResNet-50/101/152."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        # one ReLU module per activation, so per-position tools (ReLU linearization) can tell them apart
        self.relu1, self.relu2, self.relu3 = nn.ReLU(inplace=True), nn.ReLU(inplace=True), nn.ReLU(inplace=True)
        self.downsample = projection(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.downsample(x))


class ImageNetResNet(nn.Module):
    """7x7/2 stem, 3x3/2 max-pool, four stages (64-512 wide), global pool, FC."""

    def __init__(
        self,
        block: Type[Union[BasicBlock, Bottleneck]],
        layers: Sequence[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        image_size: int = 224,
    ):
        super().__init__()
        if image_size < 32:
            raise ConfigError(
                f"ImageNet ResNets downsample 32x, so image_size must be >= 32, got "
                f"{image_size}; resize the input or use a CIFAR ResNet (resnet20, ...)"
            )
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_planes = 64
        stages: list[nn.Module] = []
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks: list[nn.Module] = []
            for j in range(count):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(in_planes, planes, stride))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)
        kaiming_init(self, mode="fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


@MODELS.register("resnet18")
def resnet18(*, num_classes: int = 1000, in_channels: int = 3, image_size: int = 224) -> nn.Module:
    """ResNet-18, ImageNet layout (He et al., 2016)."""
    return ImageNetResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, image_size)


@MODELS.register("resnet50")
def resnet50(*, num_classes: int = 1000, in_channels: int = 3, image_size: int = 224) -> nn.Module:
    """ResNet-50, ImageNet layout, bottleneck v1.5 (He et al., 2016)."""
    return ImageNetResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels, image_size)
