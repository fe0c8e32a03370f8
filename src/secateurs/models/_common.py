"""Shared pieces of the model zoo: the registry, argument checks and initialisers.

Kept apart from ``__init__`` so family modules can register themselves without a
circular import.
"""
from __future__ import annotations

import math

import torch.nn as nn

from ..errors import ConfigError
from ..registry import Registry
from ..validate import check_int

MODELS: Registry = Registry("model")


def require_positive(**values: int) -> None:
    """Reject non-positive sizes early, with the offending argument named."""
    for name, value in values.items():
        check_int(value, name, minimum=1)


def require_divisible(image_size: int, pools: int, model: str, hint: str) -> int:
    """Image side after ``pools`` 2x max-pools; an error if a pool would drop pixels."""
    factor = 2**pools
    if image_size % factor:
        raise ConfigError(
            f"{model} halves the image {pools} times, so image_size must be divisible by "
            f"{factor}, got {image_size}; {hint}"
        )
    return image_size // factor


def glorot_init(model: nn.Module) -> None:
    """Glorot-normal weights, zero biases (Glorot & Bengio, 2010).

    This is the initialisation Frankle & Carbin (2019) used for LeNet and Conv-2/4/6,
    so lottery-ticket rewinding experiments start from the same distribution.
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def kaiming_init(model: nn.Module, mode: str = "fan_out") -> None:
    """Kaiming-normal convs, BN weight 1 / bias 0 (He et al., 2015).

    Keeps activation variance stable through deep ReLU stacks; ``fan_out`` follows the
    torchvision ResNet recipe, ``fan_in`` the original paper.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def variance_scaling_init(model: nn.Module) -> None:
    """He-normal (fan-in) weights of every conv / linear layer, zero biases: the "VS-H"
    variance scaling among the initialisations SNIP (Lee et al. 2019) is tested under. Its
    larger scale than Glorot's keeps a very sparse layer's signal from vanishing. (The SNIP
    reference code itself uses TensorFlow's default, :func:`lecun_normal_init`.)"""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


#: the standard deviation of a unit normal truncated to [-2, 2]: dividing by it gives the
#: truncated draw the variance the untruncated one would have (as TensorFlow does)
_TRUNCATED_STD = 0.87962566103423978


def lecun_normal_init(model: nn.Module) -> None:
    """Truncated-normal weights with variance 1 / fan-in, zero biases: TensorFlow's default
    ``variance_scaling_initializer()`` (Keras ``lecun_normal``). This is what the SNIP
    reference code (``namhoonlee/snip-public``, TensorFlow) initialises its LeNets with, so
    a reproduction can start from the same distribution; it is half He's variance."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            std = math.sqrt(1.0 / fan_in) / _TRUNCATED_STD
            nn.init.trunc_normal_(m.weight, 0.0, std, -2.0 * std, 2.0 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


#: initialisations a config may ask for instead of a model's own (``model.init``)
INITIALISATIONS = {
    "glorot_normal": glorot_init,
    "variance_scaling": variance_scaling_init,
    "lecun_normal": lecun_normal_init,
}
