"""Symmetric label noise (data.label_noise): training labels only, an exact count, always to a
different class, fixed by the seed; run hashes unchanged while it is unset."""
from __future__ import annotations

import pytest
import torch

from secateurs.data import ImageDataset
from secateurs.errors import ConfigError
from secateurs.experiments.config import DataConfig, load_config
from secateurs.experiments.lottery import load_lottery_config
from secateurs.experiments.sweep import _Data
from secateurs.seeding import derive_seed


def make_dataset(n_train: int = 1000, n_test: int = 200, classes: int = 10) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    return ImageDataset(
        name="toy",
        train_images=torch.randint(0, 256, (n_train, 1, 4, 4), generator=g, dtype=torch.uint8),
        train_labels=torch.randint(0, classes, (n_train,), generator=g),
        test_images=torch.randint(0, 256, (n_test, 1, 4, 4), generator=g, dtype=torch.uint8),
        test_labels=torch.randint(0, classes, (n_test,), generator=g),
        num_classes=classes, mean=(0.5,), std=(0.25,),
    )


@pytest.mark.parametrize("rate, flipped", [(0.2, 200), (0.4, 400), (0.0015, 2), (0.5, 500)])
def test_exact_count_flipped_and_none_to_itself(rate, flipped):
    clean = make_dataset()
    noisy = clean.with_label_noise(rate, seed=3)
    changed = noisy.train_labels != clean.train_labels
    # every chosen example changes class, so the changed count is the chosen count
    assert int(changed.sum()) == flipped == round(rate * len(clean.train_labels))
    assert noisy.train_labels.dtype == torch.int64
    assert int(noisy.train_labels.min()) >= 0 and int(noisy.train_labels.max()) < clean.num_classes


def test_new_labels_spread_over_the_other_classes():
    clean = make_dataset(n_train=20000, classes=4)
    noisy = clean.with_label_noise(0.5, seed=0)
    changed = noisy.train_labels != clean.train_labels
    offsets = (noisy.train_labels[changed] - clean.train_labels[changed]) % 4
    counts = torch.bincount(offsets, minlength=4)
    assert counts[0] == 0
    assert all(abs(int(c) - 10000 / 3) < 300 for c in counts[1:])  # uniform over the 3 other classes


def test_same_seed_same_flips_other_seed_other_flips():
    clean = make_dataset()
    a, b = clean.with_label_noise(0.2, seed=7), clean.with_label_noise(0.2, seed=7)
    c = clean.with_label_noise(0.2, seed=8)
    assert torch.equal(a.train_labels, b.train_labels)
    assert not torch.equal(a.train_labels, c.train_labels)


def test_test_labels_and_images_untouched_and_original_not_mutated():
    clean = make_dataset()
    before = clean.train_labels.clone()
    noisy = clean.with_label_noise(0.3, seed=1)
    assert torch.equal(clean.train_labels, before)
    assert noisy.test_labels is clean.test_labels and noisy.test_images is clean.test_images
    assert noisy.train_images is clean.train_images
    assert clean.with_label_noise(0.0, seed=1) is clean


def test_run_data_noises_training_labels_only_after_the_holdout():
    clean = make_dataset()
    config = load_config(overrides={"data.label_noise": 0.25, "data.validation": 200, "device": "cpu", "seed": 5})
    data = _Data(config, clean)
    held = clean.holdout(200, seed=0)
    assert torch.equal(data.dataset.val_labels, held.val_labels)  # validation stays clean
    assert torch.equal(data.dataset.test_labels, clean.test_labels)
    assert int((data.dataset.train_labels != held.train_labels).sum()) == 200  # 25% of the 800 left
    expected = held.with_label_noise(0.25, derive_seed(5, "data", "label-noise"))
    assert torch.equal(data.dataset.train_labels, expected.train_labels)
    # unset: the same labels, the same object
    assert _Data(load_config(overrides={"device": "cpu"}), clean).dataset is clean


def test_hash_unchanged_when_unset():
    # these names are what the code before data.label_noise existed gives
    assert load_lottery_config("configs/lth_lenet300_mnist.yaml").run_name() == "lth-lenet300-mnist-43f123c5"
    assert load_config("configs/demo_lenet300_mnist.yaml").run_name() == "demo-lenet300-mnist-c235e81a"
    base = load_config("configs/demo_lenet300_mnist.yaml")
    zero = load_config("configs/demo_lenet300_mnist.yaml", {"data.label_noise": 0.0})
    noisy = load_config("configs/demo_lenet300_mnist.yaml", {"data.label_noise": 0.2})
    assert zero.short_hash() == base.short_hash() != noisy.short_hash()
    assert noisy.non_default()["data"]["label_noise"] == 0.2


@pytest.mark.parametrize("rate", [1.0, 1.5, -0.1, float("nan")])
def test_bad_rates_refused(rate):
    with pytest.raises(ConfigError, match=r"data\.label_noise.*e\.g\. data\.label_noise=0\.2"):
        DataConfig(label_noise=rate)
    with pytest.raises(ConfigError, match=r"data\.label_noise"):
        load_config(overrides={"data.label_noise": rate})
    with pytest.raises(ConfigError, match=r"data\.label_noise"):
        make_dataset().with_label_noise(rate, seed=0)


def test_single_class_dataset_refused():
    one = make_dataset(classes=1)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        one.with_label_noise(0.1, seed=0)
