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
from xsam.label_noise import symmetric_label_noise
from xsam.tiny_imagenet import STATS as TINY_STATS


def write_fake_cifar(root, name="cifar10", per_file=6, first_image=None):
    """A tiny data set in the standard python-pickle layout (random pixels, valid labels).

    ``first_image`` (one byte value) makes the first training image a flat colour.
    """
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
        if first_image is not None and file in ("data_batch_1", "train"):
            batch[b"data"][0] = first_image
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
    a = augment_images(x, torch.Generator().manual_seed(1), cutout_p=1.0)
    b = augment_images(x, torch.Generator().manual_seed(1), cutout_p=1.0)
    c = augment_images(x, torch.Generator().manual_seed(2), cutout_p=1.0)
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


def test_cutout_cuts_about_half_the_samples():
    x = torch.randn(400, 3, 32, 32)
    # A pad value far from 0 so that only Cutout makes all-zero pixels.
    half = augment_images(x, torch.Generator().manual_seed(3), pad_value=-5.0)
    always = augment_images(x, torch.Generator().manual_seed(3), pad_value=-5.0, cutout_p=1.0)
    never = augment_images(x, torch.Generator().manual_seed(3), pad_value=-5.0, cutout_p=0.0)
    cut = (half == 0).all(1).flatten(1).any(1)
    assert 0.4 < cut.float().mean() < 0.6  # p = 0.5, as in the reference's Cutout(p=0.5)
    assert not (never == 0).all(1).any()
    # Kept holes are exactly where cutout_p = 1 cuts; the other samples are left whole.
    assert torch.equal(half[cut], always[cut]) and torch.equal(half[~cut], never[~cut])


def test_crop_pads_with_the_pad_value_per_channel():
    x = torch.full((64, 3, 32, 32), 7.0)
    pad = (-1.0, -2.0, -3.0)
    out = augment_images(x, torch.Generator().manual_seed(0), pad_value=pad, cutout_p=0.0)
    for channel, value in enumerate(pad):
        values = set(out[:, channel].unique().tolist())
        assert values == {7.0, value}  # image or padding, never the old 0
    # Offset 4 of 0..8 in both directions is the only crop without padding: most samples pad.
    padded = (out != 7.0).flatten(1).any(1).float().mean()
    assert padded > 0.7


def test_cifar_pads_with_black_as_the_reference_does_before_normalising(tmp_path):
    write_fake_cifar(tmp_path, first_image=0)
    data = load_dataset("cifar10", data_root=tmp_path)
    black = data.x_train[0]  # the all-zero image, normalised
    assert black.flatten(1).std(1).max() == 0
    assert torch.equal(black[:, 0, 0], torch.tensor(data.pad_value))
    white = torch.full((64, 3, 32, 32), 1.0)
    out = data.augment_batch(white, torch.Generator().manual_seed(0))
    for channel in range(3):
        # White image, black padding, Cutout's mean-grey (0) holes: nothing else.
        assert set(out[:, channel].unique().tolist()) <= {1.0, data.pad_value[channel], 0.0}
    assert (out == torch.tensor(data.pad_value)[None, :, None, None]).all(1).any()


# --- label noise --------------------------------------------------------------------------

NOISY = {"num_classes": 10, "num_train": 4000, "num_test": 200}


def noisy_config(noise, seed=0, **data):
    from xsam.config import TrainConfig

    return TrainConfig.model_validate(
        {
            "model": {"name": "mlp"},
            "data": {"name": "synthetic", "label_noise": noise, "options": NOISY, **data},
            "seed": seed,
        }
    )


def test_label_noise_flips_the_training_labels_to_other_classes():
    clean = load_dataset("synthetic", **NOISY)
    noisy = load_dataset(noisy_config(0.3))
    changed = noisy.y_train != clean.y_train
    # Symmetric noise to an *other* class: the realised fraction is the rate, up to sampling.
    assert abs(changed.float().mean().item() - 0.3) < 0.03
    assert noisy.label_noise_fraction == pytest.approx(changed.float().mean().item())
    assert clean.label_noise_fraction == 0.0
    # Every wrong class is drawn: shifts 1..9 (mod 10) all occur, none more than twice as often.
    shifts = ((noisy.y_train - clean.y_train) % 10)[changed].bincount(minlength=10)
    assert shifts[0] == 0 and shifts[1:].min() > shifts[1:].max() / 2
    # The test split and the inputs stay clean.
    assert torch.equal(noisy.y_test, clean.y_test) and torch.equal(noisy.x_train, clean.x_train)


def test_label_noise_is_fixed_by_the_seed():
    a, b = load_dataset(noisy_config(0.2, seed=5)), load_dataset(noisy_config(0.2, seed=5))
    assert torch.equal(a.y_train, b.y_train)  # every rank and every retry
    other = load_dataset(noisy_config(0.2, seed=6))
    assert not torch.equal(a.y_train, other.y_train)
    # An explicit noise seed overrides the run's; num_train keeps a prefix of the same labels.
    assert torch.equal(load_dataset(noisy_config(0.2, seed=6), noise_seed=5).y_train, a.y_train)
    few = load_dataset(noisy_config(0.2, seed=5, num_train=100))
    assert torch.equal(few.y_train, a.y_train[:100])


def test_more_noise_flips_a_superset_of_the_labels():
    labels = torch.arange(1000) % 7
    low, low_flipped = symmetric_label_noise(labels, 7, 0.1, seed=3)
    high, high_flipped = symmetric_label_noise(labels, 7, 0.3, seed=3)
    # A noise sweep corrupts the same samples first, with the same wrong classes.
    assert (high_flipped | ~low_flipped).all() and torch.equal(high[low_flipped], low[low_flipped])
    with pytest.raises(ConfigurationError, match=r"data\.label_noise: needs at least 2 classes"):
        symmetric_label_noise(torch.zeros(5, dtype=torch.int64), 1, 0.5, seed=0)


@pytest.mark.parametrize("noise", [1.5, 1.0, -0.1, float("nan")])
def test_bad_label_noise_names_the_field(noise):
    from pydantic import ValidationError

    from xsam.config import describe_errors

    with pytest.raises(ValidationError) as info:
        noisy_config(noise)
    assert describe_errors(info.value) == [f"data.label_noise: must be in [0, 1) (got {noise})"]
    with pytest.raises(ConfigurationError, match=r"data\.label_noise: must be in \[0, 1\)"):
        load_dataset("synthetic", label_noise=noise)


# --- Tiny-ImageNet --------------------------------------------------------------------------

#: wnid → flat colour of its images; wnids.txt lists them unsorted on purpose.
TINY_CLASSES = {"n0300": (250, 10, 10), "n0100": (10, 250, 10), "n0200": (10, 10, 250)}


def write_fake_tiny_imagenet(root, per_class=2):
    """The standard tiny-imagenet-200 layout: 64×64 JPEGs, one flat colour per class."""
    from PIL import Image

    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(TINY_CLASSES) + "\n")
    for wnid, colour in TINY_CLASSES.items():
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (64, 64), colour).save(folder / f"{wnid}_{i}.JPEG")
    lines = []
    for i, wnid in enumerate(["n0200", "n0100", "n0300"]):
        Image.new("RGB", (64, 64), TINY_CLASSES[wnid]).save(
            base / "val" / "images" / f"val_{i}.JPEG"
        )
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    # A greyscale image, as the real set has: it must come out as three equal channels.
    Image.new("L", (64, 64), 128).save(base / "val" / "images" / "val_3.JPEG")
    lines.append("val_3.JPEG\tn0100\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


def pixels(x):
    """Normalised Tiny-ImageNet images back to 0..255."""
    mean, std = (torch.tensor(s)[:, None, None] for s in TINY_STATS)
    return (x * std + mean) * 255


def test_fake_tiny_imagenet_loads_at_32px_with_sorted_class_ids(tmp_path):
    write_fake_tiny_imagenet(tmp_path / "tiny")
    data = load_dataset("tiny_imagenet", data_root=tmp_path / "tiny")
    assert data.x_train.shape == (6, 3, 32, 32) and data.x_test.shape == (4, 3, 32, 32)
    assert data.num_classes == 3 and data.augment
    assert data.y_test.tolist() == [1, 0, 2, 0]  # sorted wnids: n0100 → 0, n0200 → 1, n0300 → 2
    wnids = sorted(TINY_CLASSES)
    for x, y in [
        *zip(data.x_train, data.y_train, strict=True),
        *zip(data.x_test[:3], data.y_test[:3], strict=True),
    ]:
        colour = torch.tensor(TINY_CLASSES[wnids[y]], dtype=torch.float32)
        # JPEG may move a flat colour by a few levels; a wrong label would move it by ~240.
        assert (pixels(x).mean((1, 2)) - colour).abs().max() < 8
    grey = pixels(data.x_test[3])
    assert (grey - 128).abs().max() < 3
    assert data.pad_value == pytest.approx(tuple(-m / s for m, s in zip(*TINY_STATS, strict=True)))


def test_tiny_imagenet_is_decoded_once_then_cached(tmp_path, monkeypatch):
    write_fake_tiny_imagenet(tmp_path)
    first = load_dataset("tiny_imagenet", data_root=tmp_path)
    assert len(list((tmp_path / "tiny-imagenet-200").glob("xsam-32px-*.npz"))) == 1
    import PIL.Image

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(PIL.Image, "open", no_decoding)
    again = load_dataset("tiny_imagenet", data_root=tmp_path)
    assert torch.equal(first.x_train, again.x_train) and torch.equal(first.y_test, again.y_test)


def test_tiny_imagenet_size_option(tmp_path):
    write_fake_tiny_imagenet(tmp_path)
    data = load_dataset("tiny_imagenet", data_root=tmp_path, size=64)
    assert data.input_shape == (3, 64, 64) and not data.augment  # the crop recipe is 32×32
    with pytest.raises(ConfigurationError, match=r"data\.options\.size"):
        load_dataset("tiny_imagenet", data_root=tmp_path, size=0)


def test_missing_tiny_imagenet_says_where_it_looked(tmp_path):
    with pytest.raises(DataError, match="tiny-imagenet-200"):
        load_dataset("tiny_imagenet", data_root=tmp_path)


def test_tiny_imagenet_bad_annotation_names_the_line(tmp_path):
    base = write_fake_tiny_imagenet(tmp_path)
    annotations = base / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + "val_9.JPEG\tn9999\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=r"val_annotations\.txt:5: .*n9999"):
        load_dataset("tiny_imagenet", data_root=tmp_path)
