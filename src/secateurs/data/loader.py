"""Batches of a small in-memory dataset, without DataLoader's per-sample overhead."""
from __future__ import annotations

from typing import Any, Iterator

import torch

from ..errors import CheckpointError, ConfigError, DataError
from ..validate import check_int
from .transforms import BatchTransform, to_float


class InMemoryLoader:
    """Whole small dataset as one tensor on the training device; batches by index (much faster than DataLoader here).

    Shuffling and augmentation draw from one internal CPU generator seeded with ``seed``, so
    an epoch is fully determined by the seed and the number of epochs before it, which is
    what :meth:`state_dict` saves.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        transform: BatchTransform | None = None,
        augment: bool = False,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        _validate(images, labels, batch_size, drop_last, transform, augment)
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.transform = transform
        self.augment = augment
        self._generator = torch.Generator().manual_seed(seed)
        self._epoch = 0

    @property
    def epoch(self) -> int:
        """Epochs started so far."""
        return self._epoch

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._epoch += 1
        n = len(self.labels)
        order = torch.randperm(n, generator=self._generator) if self.shuffle else torch.arange(n)
        order = order.to(self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self._batch(self.images[idx]), self.labels[idx]

    def _batch(self, images: torch.Tensor) -> torch.Tensor:
        if self.transform is None:
            return to_float(images)
        return self.transform(images, self._generator if self.augment else None)

    def state_dict(self) -> dict[str, Any]:
        """Take it between epochs; a new loader given it replays the next epochs bit for bit."""
        return {"generator": self._generator.get_state(), "epoch": self._epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or not {"generator", "epoch"} <= state.keys():
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(
                f"loader state needs keys 'generator' and 'epoch', got {found}; "
                "pass what InMemoryLoader.state_dict() returned"
            )
        try:
            self._generator.set_state(torch.as_tensor(state["generator"], dtype=torch.uint8).cpu())
        except (RuntimeError, TypeError, ValueError) as exc:
            raise CheckpointError(f"loader state has an invalid generator state ({exc}); the checkpoint is corrupted") from exc
        self._epoch = int(state["epoch"])


def _validate(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    drop_last: bool,
    transform: BatchTransform | None,
    augment: bool,
) -> None:
    check_int(batch_size, "batch_size", minimum=1)
    if len(images) != len(labels):
        raise DataError(f"loader got {len(images)} images but {len(labels)} labels; pass matching splits")
    if len(labels) == 0:
        raise DataError("loader got an empty dataset; check the split (holdout size, file contents)")
    if drop_last and batch_size > len(labels):
        raise ConfigError(
            f"batch_size {batch_size} exceeds the {len(labels)} samples with drop_last=True, "
            "so an epoch would have no batches; lower batch_size or set drop_last=False"
        )
    if augment and transform is None:
        raise ConfigError("augment=True needs a transform; pass transform=BatchTransform(..., crop_padding/flip)")
