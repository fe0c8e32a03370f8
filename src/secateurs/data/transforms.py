"""Batch transforms as tensor ops on whole batches, on whatever device the batch lives.

Per-sample augmentation is vectorized (no Python loop over samples) and draws its random
numbers from a CPU ``torch.Generator``: the same seed gives the same batch on CPU and GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError

_PAD_MODES = MappingProxyType({"zeros": "constant", "reflect": "reflect"})


def _check_batch(x: torch.Tensor, what: str) -> None:
    if x.dim() != 4:
        raise ConfigError(f"{what} expects a batch [B, C, H, W], got shape {tuple(x.shape)}")


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 to float32 in [0, 1]."""
    if images.dtype != torch.uint8:
        raise ConfigError(f"to_float expects uint8 images, got {images.dtype}; ImageDataset stores uint8")
    return images.to(torch.float32).div_(255.0)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel ``(x - mean) / std``; mean and std are on the [0, 1] scale."""
    _check_batch(x, "normalize")
    if len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise ConfigError(
            f"normalize got {len(mean)} means and {len(std)} stds for {x.shape[1]} channels; give one per channel"
        )
    shape = (1, -1, 1, 1)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return (x - mean_t) / std_t


def random_crop(
    x: torch.Tensor, padding: int, generator: torch.Generator, padding_mode: str = "zeros"
) -> torch.Tensor:
    """Pad by ``padding`` then cut an H x W window at a random offset per sample.

    Two gathers with per-sample row and column index grids do all samples at once.
    """
    _check_batch(x, "random_crop")
    if padding < 0:
        raise ConfigError(f"random_crop padding must be >= 0, got {padding}")
    if padding_mode not in _PAD_MODES:
        raise ConfigError(f"unknown padding_mode {padding_mode!r}; use one of {', '.join(_PAD_MODES)}")
    if padding == 0:
        return x
    b, c, h, w = x.shape
    if padding_mode == "reflect" and padding >= min(h, w):
        raise ConfigError(f"reflect padding {padding} needs images larger than it, got {h}x{w}; lower crop_padding")
    padded = F.pad(x, (padding, padding, padding, padding), mode=_PAD_MODES[padding_mode])
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator).to(x.device)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # [B, W]
    padded = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * padding))
    return padded.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def horizontal_flip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each sample left-right with probability ``p``."""
    _check_batch(x, "horizontal_flip")
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"horizontal_flip p must be in [0, 1], got {p}")
    flip = (torch.rand(x.shape[0], generator=generator) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


@dataclass(frozen=True)
class BatchTransform:
    """uint8 batch -> augmented (when a generator is given) and normalized float batch.

    Order follows the usual pipeline: crop and flip act on [0, 1] pixels, so zero padding is
    black, and normalization comes last.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 0
    flip: bool = False
    padding_mode: str = "reflect"

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise ConfigError(f"BatchTransform got {len(self.mean)} means but {len(self.std)} stds")
        if self.crop_padding < 0:
            raise ConfigError(f"crop_padding must be >= 0, got {self.crop_padding}")
        if self.padding_mode not in _PAD_MODES:
            raise ConfigError(f"unknown padding_mode {self.padding_mode!r}; use one of {', '.join(_PAD_MODES)}")

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment only when ``generator`` is given: evaluation passes None."""
        x = to_float(images)
        if generator is not None:
            if self.crop_padding:
                x = random_crop(x, self.crop_padding, generator, self.padding_mode)
            if self.flip:
                x = horizontal_flip(x, generator)
        return normalize(x, self.mean, self.std)
