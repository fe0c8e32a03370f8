"""The one in-memory dataset type every loader returns and every trainer consumes."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import ConfigError, DataError
from ..validate import check_int, check_number

_STATS_CHUNK = 4096  # samples per chunk, so statistics never need a float copy of the whole set


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Train/test (and optional validation) images kept as uint8 [N, C, H, W].

    uint8 because the whole set lives in memory (CIFAR as float32 would take 600 MB);
    batches become float in :class:`~secateurs.data.transforms.BatchTransform`.
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    val_images: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # Checked here once so a broken loader fails at load time, not mid-training.
        if (self.val_images is None) != (self.val_labels is None):
            raise DataError(f"{self.name}: val_images and val_labels must be given together")
        shape = None
        for split, images, labels in self._splits():
            _check_split(self.name, split, images, labels, self.num_classes)
            if shape is None:
                shape = images.shape[1:]
            elif images.shape[1:] != shape:
                raise DataError(
                    f"{self.name}: {split} images are {tuple(images.shape[1:])} but train images are "
                    f"{tuple(shape)}; all splits must share one [C, H, W] shape"
                )
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise DataError(
                f"{self.name}: mean/std have {len(self.mean)}/{len(self.std)} values for "
                f"{self.in_channels} channels; give one value per channel"
            )

    def _splits(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        splits = [("train", self.train_images, self.train_labels), ("test", self.test_images, self.test_labels)]
        if self.val_images is not None and self.val_labels is not None:
            splits.append(("val", self.val_images, self.val_labels))
        return splits

    @property
    def in_channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_images.shape[2]), int(self.train_images.shape[3])

    @property
    def input_dim(self) -> int:
        """Features per sample once flattened, the input width of an MLP."""
        return self.in_channels * self.image_size[0] * self.image_size[1]

    def holdout(self, n_val: int, seed: int) -> ImageDataset:
        """Move a seeded random ``n_val`` training samples into ``val_*``.

        Model selection must not look at the test set; both parts keep their original order
        so the split depends on ``seed`` alone.
        """
        n_train = len(self.train_labels)
        if self.val_images is not None:
            raise ConfigError(f"{self.name} already has a validation split; call holdout() only once")
        check_int(n_val, "holdout n_val", minimum=1, below=n_train, hint=f"{self.name} has {n_train} training samples")
        order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
        val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
        return replace(
            self,
            train_images=self.train_images[train_idx],
            train_labels=self.train_labels[train_idx],
            val_images=self.train_images[val_idx],
            val_labels=self.train_labels[val_idx],
        )

    def with_label_noise(self, rate: float, seed: int) -> ImageDataset:
        """Symmetric label noise on the training labels only: exactly ``round(rate * N)``
        training examples, chosen by ``seed``, each relabelled uniformly to one of the *other*
        ``num_classes - 1`` classes (so every chosen label really changes). Validation and test
        labels are untouched. ``rate`` 0 returns ``self``.

        The sparse-double-descent code (open_lth-based) has two variants: ``randomize_labels``
        draws the new label from all classes (about 1/C of the picks keep their label) and
        ``symmetric_noisy_labels`` flips each label independently with probability ``rate``
        (a random count); this one fixes both the count and that the label changes.
        """
        check_number(rate, "data.label_noise", minimum=0, below=1,
                     hint="the fraction of training labels to corrupt, e.g. data.label_noise=0.2")
        if rate == 0:
            return self
        if self.num_classes < 2:
            raise ConfigError(f"data.label_noise needs at least 2 classes to flip between; {self.name} has "
                              f"{self.num_classes}. Drop data.label_noise")
        n = len(self.train_labels)
        count = int(round(rate * n))
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(n, generator=generator)[:count]
        # an offset in 1..C-1 added modulo C is uniform over the other classes
        offset = torch.randint(1, self.num_classes, (count,), generator=generator)
        labels = self.train_labels.clone()
        labels[chosen] = (labels[chosen] + offset) % self.num_classes
        return replace(self, train_labels=labels)


def _check_split(name: str, split: str, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    """One message per way a split can be malformed, naming the dataset and the split."""
    where = f"{name} {split}"
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise DataError(
            f"{where} images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}; "
            "convert them in the loader"
        )
    if labels.dtype != torch.int64 or labels.dim() != 1:
        raise DataError(f"{where} labels must be int64 [N], got {labels.dtype} {tuple(labels.shape)}")
    if len(images) != len(labels):
        raise DataError(f"{where} has {len(images)} images but {len(labels)} labels; the files do not match")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(
            f"{where} labels span {int(labels.min())}..{int(labels.max())}, outside 0..{num_classes - 1} "
            f"for {num_classes} classes; check the label files"
        )


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the [0, 1] scale, for datasets without published values.

    Accumulated in float64 chunks: exact enough, and no full-size float copy.
    """
    if images.dim() != 4 or len(images) == 0:
        raise DataError(f"channel statistics need a non-empty [N, C, H, W] batch, got {tuple(images.shape)}")
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for chunk in images.split(_STATS_CHUNK):
        x = chunk.to(torch.float64).div_(255.0)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
    count = images.numel() // channels
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0.0).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant channel must not divide by zero
    return tuple(mean.tolist()), tuple(std.tolist())
