"""The data set registry, deterministic sharded batching and on-device augmentation.

A data set is loaded whole into tensors on the training device (`Dataset`); every epoch is a
fixed permutation (seed + epoch) split into equal per-rank shards, so DDP ranks run the same
number of steps and a resumed run sees exactly the batches an uninterrupted one would.

Registered data sets (``data.name``), read from ``<data root>/<data.root>``:

- ``mnist1d`` — generated offline by the ``mnist1d`` package (default arguments: 4000 train,
  1000 test, length 40) and cached there as an ``.npz``; options: any field of
  ``mnist1d.data.get_dataset_args()`` except ``url`` (e.g. ``num_samples``, ``seed``).
- ``digits`` — scikit-learn's 8×8 digits, a fixed stratified 80/20 split; no options.
- ``cifar10`` / ``cifar100`` — the standard python-pickle directories ``cifar-10-batches-py``
  (``data_batch_1..5``, ``test_batch``) and ``cifar-100-python`` (``train``, ``test``); no options.
- ``tiny_imagenet`` — the standard ``tiny-imagenet-200`` directory (`xsam.tiny_imagenet`),
  resized to 32×32 like the authors' code; option ``size`` (32).
- ``synthetic`` — Gaussian class clusters of any shape; options ``shape`` ([3, 32, 32]),
  ``num_classes`` (10), ``num_train`` (512), ``num_test`` (128), ``seed`` (0).

The data root is the ``data_root`` argument, else ``$XSAM_DATA_ROOT``, else
``~/.cache/xsam/data``.

Images from pixels (CIFAR, Tiny-ImageNet) are stored normalised with their per-channel mean and
std; `Dataset.pad_value` remembers where black lies, so the crop pads with black as the
reference does before normalising (`xsam.augment`). ``data.label_noise`` = p replaces each
training label, with probability p, by a uniformly drawn *other* class ("symmetric" noise,
`xsam.label_noise`), from a generator seeded by the run's seed: every rank and every retry sees
the same noisy labels, and the test labels stay clean.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xsam.augment import augment_images
from xsam.errors import ConfigurationError, DataError
from xsam.label_noise import symmetric_label_noise
from xsam.tiny_imagenet import STATS as _TINY_IMAGENET_STATS
from xsam.tiny_imagenet import load_tiny_imagenet
from xsam.val_split import hold_out

logger = logging.getLogger(__name__)

DEFAULT_DATA_ROOT = "~/.cache/xsam/data"
#: Per-channel (mean, std) of the data sets stored as normalised pixels.
_PIXEL_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tiny_imagenet": _TINY_IMAGENET_STATS,
}


@dataclass(frozen=True)
class Dataset:
    """A whole data set as tensors: float inputs ``(N, *input_shape)``, int64 labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    #: Train batches get random crop (pad 4) + horizontal flip + Cutout(16, p=0.5): 32×32 only.
    augment: bool = False
    #: The stored value of a black pixel per channel (-mean/std), what the crop pads with;
    #: 0 for data sets that are not normalised pixels.
    pad_value: float | tuple[float, ...] = 0.0
    #: The fraction of training labels that ``label_noise`` actually changed.
    label_noise_fraction: float = 0.0
    #: The held-out part of the training set (``data.val_fraction``; see xsam/val_split.py).
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def augment_batch(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The training augmentation of this data set (`augment_images` with its pad value)."""
        return augment_images(x, generator, pad_value=self.pad_value)

    def to(self, device: torch.device | str) -> Dataset:
        return replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
            x_val=None if self.x_val is None else self.x_val.to(device),
            y_val=None if self.y_val is None else self.y_val.to(device),
        )


def resolve_data_root(data_root: str | os.PathLike | None = None) -> Path:
    root = data_root or os.environ.get("XSAM_DATA_ROOT") or DEFAULT_DATA_ROOT
    return Path(root).expanduser()


def load_dataset(
    config_or_name: Any,
    *,
    data_root: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    label_noise: float | None = None,
    noise_seed: int | None = None,
    **options: Any,
) -> Dataset:
    """Load a registered data set onto ``device`` (CPU by default).

    ``config_or_name`` is a data set name, a `DataConfig`, or a `TrainConfig` (its ``data``):
    a config contributes ``root``, ``options``, ``num_train``, ``augment``, ``label_noise`` and
    the validation split (``val_fraction`` of the first ``num_train`` samples, chosen by
    ``val_seed``), and a `TrainConfig` its ``seed`` as the noise seed. ``label_noise`` and
    ``noise_seed`` given here override the config's.
    """
    subdir, num_train, augment, noise, seed = "", None, True, 0.0, 0
    val_fraction, val_seed = 0.0, 0
    if isinstance(config_or_name, str):
        name = config_or_name
    else:
        data_config = getattr(config_or_name, "data", config_or_name)
        name, subdir = data_config.name, data_config.root
        num_train, augment = data_config.num_train, data_config.augment
        noise, seed = data_config.label_noise, getattr(config_or_name, "seed", 0)
        val_fraction, val_seed = data_config.val_fraction, data_config.val_seed
        options = {**data_config.options, **options}
    noise = noise if label_noise is None else label_noise
    seed = seed if noise_seed is None else noise_seed
    if not 0.0 <= noise < 1.0:
        raise ConfigurationError(f"data.label_noise: must be in [0, 1) (got {noise})")
    if name not in DATASETS:
        raise ConfigurationError(
            f"data.name: unknown data set {name!r}; known: {', '.join(DATASETS)}"
        )
    directory = resolve_data_root(data_root) / subdir
    x_train, y_train, x_test, y_test, num_classes = DATASETS[name](directory, **options)
    y_train = torch.as_tensor(y_train, dtype=torch.int64)
    # Before num_train: a sample's noisy label does not depend on how many samples are used.
    y_train, changed = symmetric_label_noise(y_train, num_classes, noise, seed=seed)
    if num_train is not None:
        x_train, y_train, changed = x_train[:num_train], y_train[:num_train], changed[:num_train]
    fraction = float(changed.double().mean()) if len(changed) else 0.0
    if noise > 0:
        logger.info("%s: label noise %g changed %.4f of the training labels", name, noise, fraction)
    pad_value: float | tuple[float, ...] = 0.0
    if name in _PIXEL_STATS:
        # Exactly the stored value of a black pixel, rounding included.
        black = _normalise(name, np.zeros((1, len(_PIXEL_STATS[name][0]), 1, 1), np.uint8))
        pad_value = tuple(black.ravel().tolist())
    # After label noise and num_train: the held-out samples keep whatever labels they have.
    x_train, y_train, x_val, y_val = hold_out(
        torch.as_tensor(x_train, dtype=torch.float32), y_train, val_fraction, seed=val_seed
    )
    data = Dataset(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        x_test=torch.as_tensor(x_test, dtype=torch.float32),
        y_test=torch.as_tensor(y_test, dtype=torch.int64),
        num_classes=num_classes,
        augment=augment and x_train.ndim == 4 and tuple(x_train.shape[2:]) == (32, 32),
        pad_value=pad_value,
        label_noise_fraction=fraction,
    )
    return data.to(device) if device is not None else data


def _check_options(dataset: str, options: dict[str, Any], accepted: set[str]) -> None:
    for key in options:
        if key not in accepted:
            known = ", ".join(sorted(accepted)) or "none"
            raise ConfigurationError(
                f"data.options.{key}: not an option of data set {dataset!r} (options: {known})"
            )


# --- the loaders: directory, **options → (x_train, y_train, x_test, y_test, num_classes) ----


#: mnist1d.data.get_dataset_args() without ``url`` (a test keeps them equal): importing the
#: package costs ~2 s, so it is imported only when the cache must be generated.
MNIST1D_DEFAULTS: dict[str, Any] = {
    "num_samples": 5000,
    "train_split": 0.8,
    "template_len": 12,
    "padding": [36, 60],
    "scale_coeff": 0.4,
    "max_translation": 48,
    "corr_noise_scale": 0.25,
    "iid_noise_scale": 0.02,
    "shear_scale": 0.75,
    "shuffle_seq": False,
    "final_seq_length": 40,
    "seed": 42,
}


def _mnist1d(directory: Path, **options: Any):
    _check_options("mnist1d", options, set(MNIST1D_DEFAULTS))
    settings = {**MNIST1D_DEFAULTS, **options}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    cache = directory / f"mnist1d-{digest}.npz"
    if not cache.exists():
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        for key, value in settings.items():
            setattr(args, key, value)
        # make_dataset reseeds the global numpy/random generators; keep the caller's.
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            raw = make_dataset(args)
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        arrays = {k: np.asarray(raw[k]) for k in ("x", "y", "x_test", "y_test")}
        try:
            directory.mkdir(parents=True, exist_ok=True)
            # Atomic: several ranks (or jobs) may generate the same file at once.
            tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(
                tmp, x=arrays["x"], y=arrays["y"], x_test=arrays["x_test"], y_test=arrays["y_test"]
            )
            tmp.replace(cache)
        except OSError:
            pass  # a read-only data root only costs the regeneration next time
    else:
        with np.load(cache) as f:
            arrays = {k: f[k] for k in f.files}
    x, x_test = arrays["x"][:, None, :], arrays["x_test"][:, None, :]
    return x, arrays["y"], x_test, arrays["y_test"], 10


def _digits(directory: Path, **options: Any):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    _check_options("digits", options, set())
    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    x_train, x_test, y_train, y_test = train_test_split(
        x, bunch.target, test_size=0.2, random_state=0, stratify=bunch.target
    )
    return x_train, y_train, x_test, y_test, 10


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            return pickle.load(f, encoding="bytes")
    except FileNotFoundError as exc:
        raise DataError(f"missing CIFAR file {path}") from exc
    except (OSError, pickle.UnpicklingError, EOFError) as exc:
        raise DataError(f"cannot read CIFAR file {path}: {exc}") from exc


def _cifar(name: str, directory: Path, **options: Any):
    _check_options(name, options, set())
    folder, train_files, test_files, label_key, classes = {
        "cifar10": (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            ["test_batch"],
            b"labels",
            10,
        ),
        "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
    }[name]
    # Accept the data root's parent directory or the pickle directory itself.
    base = directory if (directory / train_files[0]).exists() else directory / folder
    if not (base / train_files[0]).exists():
        raise DataError(
            f"{name} not found: expected the python-pickle directory {directory / folder} "
            f"(with {', '.join([*train_files, *test_files])})"
        )

    def read(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for file in files:
            batch = _unpickle(base / file)
            try:
                xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(batch[label_key], dtype=np.int64))
            except (KeyError, ValueError) as exc:
                raise DataError(f"{base / file} is not a {name} batch: {exc!r}") from exc
        return np.concatenate(xs), np.concatenate(ys)

    (x_train, y_train), (x_test, y_test) = read(train_files), read(test_files)
    return _normalise(name, x_train), y_train, _normalise(name, x_test), y_test, classes


def _normalise(name: str, pixels: np.ndarray) -> np.ndarray:
    """uint8 ``(N, C, H, W)`` → float32 (pixel/255 - mean) / std per channel."""
    mean, std = (np.asarray(s, dtype=np.float32)[None, :, None, None] for s in _PIXEL_STATS[name])
    return (pixels.astype(np.float32) / 255.0 - mean) / std


def _tiny_imagenet(directory: Path, **options: Any):
    _check_options("tiny_imagenet", options, {"size"})
    size = options.get("size", 32)
    if not isinstance(size, int) or not 8 <= size <= 64:
        raise ConfigurationError(f"data.options.size: must be an integer in [8, 64] (got {size!r})")
    x_train, y_train, x_test, y_test, classes = load_tiny_imagenet(directory, size=size)
    name = "tiny_imagenet"
    return _normalise(name, x_train), y_train, _normalise(name, x_test), y_test, classes


def _synthetic(
    directory: Path,
    shape: list[int] | tuple[int, ...] = (3, 32, 32),
    num_classes: int = 10,
    num_train: int = 512,
    num_test: int = 128,
    seed: int = 0,
):
    shape = tuple(int(s) for s in shape)
    if not shape or min(shape) < 1:
        raise ConfigurationError(f"data.options.shape: must be positive sizes (got {list(shape)})")
    if num_classes < 2 or num_train < 1 or num_test < 1:
        raise ConfigurationError(
            "data.options: need num_classes >= 2, num_train >= 1 and num_test >= 1"
        )
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn((num_classes, *shape), generator=g)
    y = torch.randint(0, num_classes, (num_train + num_test,), generator=g)
    x = centers[y] + torch.randn((num_train + num_test, *shape), generator=g)
    return x[:num_train], y[:num_train], x[num_train:], y[num_train:], num_classes


def _synthetic_checked(directory: Path, **options: Any):
    _check_options("synthetic", options, {"shape", "num_classes", "num_train", "num_test", "seed"})
    return _synthetic(directory, **options)


DATASETS: dict[str, Callable[..., tuple]] = {
    "mnist1d": _mnist1d,
    "digits": _digits,
    "cifar10": lambda directory, **o: _cifar("cifar10", directory, **o),
    "cifar100": lambda directory, **o: _cifar("cifar100", directory, **o),
    "synthetic": _synthetic_checked,
    "tiny_imagenet": _tiny_imagenet,
}


# --- batching ---------------------------------------------------------------------------


def per_rank_batch_size(batch_size: int, world_size: int) -> int:
    if batch_size < world_size:
        raise ConfigurationError(
            f"data.batch_size: must be >= the number of ranks ({world_size}) (got {batch_size})"
        )
    return batch_size // world_size


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    """Steps every rank runs per epoch; a trailing batch of one sample is dropped (BatchNorm)."""
    shard = num_samples // world_size
    per_rank = per_rank_batch_size(batch_size, world_size)
    if shard < 1:
        raise DataError(f"{num_samples} training samples cannot be split over {world_size} ranks")
    steps = math.ceil(shard / per_rank)
    if shard % per_rank == 1 and steps > 1:
        steps -= 1
    return steps


def epoch_shard(
    num_samples: int, epoch: int, *, seed: int, rank: int = 0, world_size: int = 1
) -> torch.Tensor:
    """This rank's sample order for ``epoch``: permutation(seed + epoch)[rank::world_size].

    The tail beyond a multiple of ``world_size`` is dropped so all shards have equal length.
    """
    g = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(num_samples, generator=g)
    usable = (num_samples // world_size) * world_size
    return perm[:usable][rank::world_size]
