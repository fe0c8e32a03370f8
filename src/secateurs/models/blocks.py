"""Residual building blocks shared by the CIFAR and ImageNet ResNets (He et al., 2016).

The blocks take their shortcut as a module, so the CIFAR nets' parameter-free option A and
the ImageNet nets' 1x1 projection are one block. Attribute names follow torchvision
(``conv1``, ``bn1``, ``downsample``), so torchvision ResNet checkpoints load by name.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def projection(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    """Option B shortcut: 1x1 conv + BN where the shortcut changes shape, identity elsewhere."""
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU (ResNet-18/34, CIFAR ResNets)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        # one ReLU module per activation, so per-position tools (ReLU linearization) can tell them apart
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample if downsample is not None else projection(in_planes, planes, stride)
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.downsample(x))
