"""Data sets load offline and deterministically; shards and augmentation are reproducible."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from xsam.config import DATASET_NAMES
from xsam.data import (
    DATASETS,
    MNIST1D_DEFAULTS,
    augment_images,
    epoch_shard,
    load_dataset,
    steps_per_epoch,
)
from xsam.errors import ConfigurationError, DataError


def write_fake_cifar(root, name="cifar10", per_file=6):
    """A tiny data set in the standard python-pickle layout (random pixels, valid labels)."""
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, files, key, classes = (
            "cifar-10-batches-py",
            [
                *(f"data_batch_{i}" for i in range(1, 6)),
                "test_batch",
            ],
            b"labels",
            10,
        )
    else:
        folder, files, key, classes = "cifar-100-python", ["train", "test"], b"fine_labels", 100
    directory = root / folder
    directory.mkdir(parents=True)
    for file in files:
        batch = {
            b"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
            key: list(rng.integers(0, classes, per_file)),
        }
        with (directory / file).open("wb") as f:
            pickle.dump(batch, f)
    return directory


def test_registry_matches_the_config_schema():
    assert tuple(DATASETS) == DATASET_NAMES


def test_mnist1d_defaults_match_the_package():
    from mnist1d.data import get_dataset_args

    args = dict(vars(get_dataset_args()))
    args.pop("url")
    assert args == MNIST1D_DEFAULTS


def test_mnist1d_is_generated_once_then_cached(tmp_path, monkeypatch):
    first = load_dataset("mnist1d", data_root=tmp_path)
    assert first.x_train.shape == (4000, 1, 40) and first.x_test.shape == (1000, 1, 40)
    assert sorted(first.y_train.unique().tolist()) == list(range(10))
    assert len(list(tmp_path.glob("mnist1d-*.npz"))) == 1

    import mnist1d.data

    def no_generation(*args, **kwargs):
        raise AssertionError("regenerated despite the cache")

    monkeypatch.setattr(mnist1d.data, "make_dataset", no_generation)
    again = load_dataset("mnist1d", data_root=tmp_path)
    assert torch.equal(first.x_train, again.x_train) and torch.equal(first.y_test, again.y_test)
    assert not first.augment  # 1-D: no image augmentation


def test_digits_fixed_split():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.input_shape == (1, 8, 8) and (len(a.y_train), len(a.y_test)) == (1437, 360)
    assert torch.equal(a.x_test, b.x_test)
    assert float(a.x_train.max()) <= 1.0


@pytest.mark.parametrize(("name", "classes"), [("cifar10", 10), ("cifar100", 100)])
def test_fake_cifar_pickle_directory_loads(tmp_path, name, classes):
    write_fake_cifar(tmp_path / "cifar", name)
    data = load_dataset(name, data_root=tmp_path / "cifar")
    n_train = 30 if name == "cifar10" else 6
    assert data.x_train.shape == (n_train, 3, 32, 32) and data.x_test.shape == (6, 3, 32, 32)
    assert data.num_classes == classes and data.augment
    assert abs(float(data.x_train.mean())) < 1.0  # normalised, not raw bytes


def test_missing_cifar_says_where_it_looked(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_dataset("cifar10", data_root=tmp_path)


def test_config_root_and_num_train(tmp_path):
    from xsam.config import TrainConfig

    write_fake_cifar(tmp_path / "sets" / "c10")
    config = TrainConfig.model_validate(
        {
            "model": {"name": "resnet18"},
            "data": {"name": "cifar10", "root": "sets/c10", "num_train": 10, "augment": False},
        }
    )
    data = load_dataset(config, data_root=tmp_path)
    assert len(data.y_train) == 10 and not data.augment


def test_synthetic_any_shape_and_deterministic():
    a = load_dataset("synthetic", shape=[2, 5], num_classes=3, num_train=40, num_test=8)
    b = load_dataset("synthetic", shape=[2, 5], num_classes=3, num_train=40, num_test=8)
    assert a.input_shape == (2, 5) and len(a.y_test) == 8 and a.num_classes == 3
    assert torch.equal(a.x_train, b.x_train)
    c = load_dataset("synthetic", shape=[2, 5], num_classes=3, num_train=40, num_test=8, seed=1)
    assert not torch.equal(a.x_train, c.x_train)


def test_unknown_data_option_names_the_config_key():
    with pytest.raises(ConfigurationError, match=r"data\.options\.colour"):
        load_dataset("synthetic", colour="red")


def test_data_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("XSAM_DATA_ROOT", str(tmp_path))
    write_fake_cifar(tmp_path)
    assert len(load_dataset("cifar10").y_train) == 30


def test_epoch_shards_are_disjoint_equal_and_deterministic():
    shards = [epoch_shard(103, 2, seed=7, rank=r, world_size=4) for r in range(4)]
    assert {len(s) for s in shards} == {25}  # 103 // 4: the tail of 3 is dropped
    together = torch.cat(shards)
    assert len(together.unique()) == 100
    assert torch.equal(shards[1], epoch_shard(103, 2, seed=7, rank=1, world_size=4))
    assert not torch.equal(epoch_shard(103, 3, seed=7), epoch_shard(103, 2, seed=7))
    # One rank alone sees the whole permutation of epoch (seed + epoch).
    assert torch.equal(epoch_shard(10, 1, seed=4), epoch_shard(10, 0, seed=5))


@pytest.mark.parametrize(
    ("n", "batch", "world", "steps"),
    [
        (4000, 125, 1, 32),
        (4000, 125, 2, 33),  # 2000 per rank in batches of 62
        (101, 50, 1, 2),  # a trailing batch of one sample would break BatchNorm: dropped
        (102, 50, 1, 3),
    ],
)
def test_steps_per_epoch(n, batch, world, steps):
    assert steps_per_epoch(n, batch, world) == steps


def test_batch_smaller_than_world_is_refused():
    with pytest.raises(ConfigurationError, match=r"data\.batch_size"):
        steps_per_epoch(100, 2, 4)


def test_augmentation_is_reproducible_and_per_sample():
    x = torch.randn(8, 3, 32, 32)
    a = augment_images(x, torch.Generator().manual_seed(1))
    b = augment_images(x, torch.Generator().manual_seed(1))
    c = augment_images(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    # Cutout: every sample has a zeroed square of at least 8×8 (clipped at the border).
    zeros = (a == 0).all(1).flatten(1).sum(1)
    assert (zeros >= 64).all()
    assert not torch.equal(a, x)


def test_val_fraction_holds_out_the_same_samples_whatever_the_run_seed():
    """data.val_fraction moves a share of the training set into a validation set, chosen by
    data.val_seed alone: every job of a study (any seed), rank and retry holds out the same."""
    from xsam.config import DataConfig

    def load(**data):
        config = DataConfig(name="synthetic", **data)
        return load_dataset(config, num_train=50, num_test=8, shape=[3])

    whole = load()
    a, b = load(val_fraction=0.2), load(val_fraction=0.2)
    assert whole.x_val is None and whole.y_val is None
    assert len(a.y_train) == 40 and len(a.y_val) == 10 and len(a.y_test) == 8
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.x_train, b.x_train)
    # Disjoint, and together exactly the training set.
    rows = {tuple(r.tolist()) for r in whole.x_train}
    train, val = {tuple(r.tolist()) for r in a.x_train}, {tuple(r.tolist()) for r in a.x_val}
    assert not train & val and train | val == rows
    other = load(val_fraction=0.2, val_seed=1)
    assert not torch.equal(other.x_val, a.x_val)
    assert torch.equal(a.x_test, whole.x_test)  # the test set is never touched


@pytest.mark.parametrize(
    "fraction",
    [
        0.001,  # rounds to no validation sample at all
        0.999,  # rounds to no training sample left
    ],
)
def test_val_fraction_that_leaves_a_split_empty_is_refused(fraction):
    from xsam.config import DataConfig

    with pytest.raises(ConfigurationError, match=r"data\.val_fraction"):
        load_dataset(DataConfig(name="synthetic", val_fraction=fraction), num_train=50)


def test_val_fraction_outside_0_1_is_a_config_error():
    from pydantic import ValidationError

    from xsam.config import DataConfig

    with pytest.raises(ValidationError, match="val_fraction"):
        DataConfig(name="synthetic", val_fraction=1.0)
