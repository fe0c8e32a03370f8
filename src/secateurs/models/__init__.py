"""Model zoo of the pruning literature, built from scratch and traceable by torch.fx.

Every model is created by name through :func:`create_model`, so configs stay declarative.
Prunable weights are plain ``nn.Conv2d`` / ``nn.Linear`` ``.weight`` parameters.
"""
from __future__ import annotations

import torch.nn as nn

from . import convnets, lenet, mlp, resnet_cifar, resnet_imagenet, vgg  # noqa: F401  (register)
from ..errors import UnknownNameError
from ._common import INITIALISATIONS, MODELS, require_positive
from .convnets import ConvNet
from .lenet import LeNet5
from .mlp import MLP
from .resnet_cifar import CifarResNet
from .resnet_imagenet import ImageNetResNet
from .vgg import VGG

__all__ = [
    "MODELS",
    "MLP",
    "LeNet5",
    "ConvNet",
    "VGG",
    "CifarResNet",
    "ImageNetResNet",
    "create_model",
    "count_parameters",
]


def create_model(
    name: str, *, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, init: str | None = None
) -> nn.Module:
    """Build a registered model; the defaults describe MNIST, pass 3/32 for CIFAR. ``init``
    replaces the model's own initialisation by one of :data:`INITIALISATIONS`."""
    factory = MODELS.get(name)
    if init is not None and init not in INITIALISATIONS:
        raise UnknownNameError(f"unknown model init {init!r}; known inits: {', '.join(sorted(INITIALISATIONS))}")
    require_positive(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    model = factory(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    if init is not None:
        INITIALISATIONS[init](model)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
