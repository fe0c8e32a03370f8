"""Datasets as uint8 tensors in memory, batch transforms, and a fast in-memory loader."""
from .catalog import DATASETS, load_dataset
from .cifar import load_cifar
from .dataset import ImageDataset, channel_stats
from .digits import load_digits_dataset
from .idx import IDX_FILES, load_idx_dir, read_idx
from .loader import InMemoryLoader
from .mnist import find_mnist_pickle, load_mnist_pickle
from .npz import NPZ_KEYS, load_npz
from .transforms import BatchTransform, horizontal_flip, normalize, random_crop, to_float

__all__ = [
    "DATASETS",
    "IDX_FILES",
    "NPZ_KEYS",
    "BatchTransform",
    "ImageDataset",
    "InMemoryLoader",
    "channel_stats",
    "find_mnist_pickle",
    "horizontal_flip",
    "load_cifar",
    "load_dataset",
    "load_digits_dataset",
    "load_idx_dir",
    "load_mnist_pickle",
    "load_npz",
    "normalize",
    "random_crop",
    "read_idx",
    "to_float",
]
