"""LeNet-5, Caffe variant (LeCun et al., 1998; as used by SNIP, Lee et al., 2019).

Caffe's version has 20/50 conv filters and a 500-unit FC layer, unlike the 6/16/120/84
original; SNIP and Han et al. (2015) report pruning results on this one.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ConfigError
from ._common import MODELS, glorot_init


class LeNet5(nn.Module):
    """conv5(20)-pool-conv5(50)-pool-fc500-fc, ReLU after each conv and hidden FC."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2  # two valid 5x5 convs, two 2x2 pools
        if side < 1:
            raise ConfigError(
                f"lenet5 needs image_size >= 16 (two 5x5 valid convs and two 2x2 pools), "
                f"got {image_size}; upsample the input or use lenet300_100"
            )
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(50 * side * side, 500),
            nn.ReLU(inplace=True),
            nn.Linear(500, num_classes),
        )
        glorot_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@MODELS.register("lenet5")
def lenet5(*, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """LeNet-5, Caffe variant (LeCun et al., 1998)."""
    return LeNet5(num_classes, in_channels, image_size)


# Without batch norm, SGD at the library's default lr 0.1 (momentum 0.9) can stall this network
# at chance (reported in issue 20: MNIST test accuracy 9.8%, loss ln 10). At 0.02 it reaches
# 99.21% in 10 epochs (0.05: 99.15%; reproductions/lenet5-lr-mnist/). Applied where a config
# does not set the lr itself.
lenet5.train_defaults = {"train.optimizer.lr": 0.02, "finetune.optimizer.lr": 0.02}
