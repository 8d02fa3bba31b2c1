"""Tiny-ImageNet from a local directory, decoded once and resized to the authors' 32×32.

The standard layout of ``tiny-imagenet-200`` (the zip from cs231n, unpacked)::

    wnids.txt                              200 WordNet ids, one a line
    train/<wnid>/images/*.JPEG             500 images of each class
    val/images/*.JPEG                      10 000 images
    val/val_annotations.txt                "<file>\\t<wnid>\\t<bbox…>" per validation image

The ``test`` split has no labels, so the labelled ``val`` split is the test set, as in the
papers. Classes are numbered in sorted wnid order (torchvision's ``ImageFolder`` order, what a
torchvision-based training script gets). Images are converted to RGB (a few are greyscale) and
resized with Pillow's bilinear filter, as ``torchvision.transforms.Resize`` does on PIL images.

Decoding 110 000 JPEGs takes a while, so the resized uint8 arrays are cached next to the data
(``xsam-<size>px-<fingerprint>.npz``, keyed by the files and their labels); a read-only data
root only costs the decoding on every load.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from xsam.errors import DataError

FOLDER = "tiny-imagenet-200"
NUM_CLASSES = 200
#: Per-channel mean and std of the training images, as commonly quoted for Tiny-ImageNet.
STATS = ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262))
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def load_tiny_imagenet(
    directory: Path, *, size: int = 32
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """``(x_train, y_train, x_test, y_test, num_classes)``: uint8 ``(N, 3, size, size)``."""
    base = directory if (directory / "wnids.txt").exists() else directory / FOLDER
    if not (base / "wnids.txt").exists():
        raise DataError(
            f"tiny_imagenet not found: expected {directory / FOLDER} "
            "(with wnids.txt, train/<wnid>/images/ and val/val_annotations.txt)"
        )
    wnids = sorted(line.strip() for line in (base / "wnids.txt").read_text().splitlines())
    wnids = [w for w in wnids if w]
    index = {wnid: i for i, wnid in enumerate(wnids)}
    train = _train_files(base, wnids, index)
    test = _val_files(base, index)
    # Labels too: an edited val_annotations.txt changes them without changing the file list.
    listing = "\n".join(f"{p.relative_to(base)}\t{y}" for p, y in train + test)
    fingerprint = hashlib.sha256(listing.encode()).hexdigest()[:12]
    cache = base / f"xsam-{size}px-{fingerprint}.npz"
    if cache.exists():
        with np.load(cache) as f:
            return f["x_train"], f["y_train"], f["x_test"], f["y_test"], len(wnids)
    arrays = {
        "x_train": _decode([p for p, _ in train], size),
        "y_train": np.asarray([y for _, y in train], dtype=np.int64),
        "x_test": _decode([p for p, _ in test], size),
        "y_test": np.asarray([y for _, y in test], dtype=np.int64),
    }
    try:
        # Atomic: several ranks (or jobs) may decode the same directory at once.
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(
            tmp,
            x_train=arrays["x_train"],
            y_train=arrays["y_train"],
            x_test=arrays["x_test"],
            y_test=arrays["y_test"],
        )
        tmp.replace(cache)
    except OSError:
        pass
    return arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], len(wnids)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)


def _train_files(base: Path, wnids: list[str], index: dict[str, int]) -> list[tuple[Path, int]]:
    files = []
    for wnid in wnids:
        folder = base / "train" / wnid / "images"
        if not folder.is_dir():
            raise DataError(
                f"tiny_imagenet: missing training folder {folder} (listed in wnids.txt)"
            )
        files += [(p, index[wnid]) for p in _images_in(folder)]
    if not files:
        raise DataError(f"tiny_imagenet: no training images under {base / 'train'}")
    return files


def _val_files(base: Path, index: dict[str, int]) -> list[tuple[Path, int]]:
    annotations = base / "val" / "val_annotations.txt"
    try:
        lines = annotations.read_text().splitlines()
    except OSError as exc:
        raise DataError(f"tiny_imagenet: cannot read {annotations}: {exc.strerror}") from exc
    files = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise DataError(
                f"{annotations}:{number}: expected '<file>\\t<wnid from wnids.txt>…', got {line!r}"
            )
        files.append((base / "val" / "images" / fields[0], index[fields[1]]))
    # Sorted by file name so the test order does not depend on the annotation file's order.
    return sorted(files, key=lambda item: item[0].name)


def _decode(paths: list[Path], size: int) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except OSError as exc:  # includes PIL's UnidentifiedImageError
            raise DataError(f"tiny_imagenet: cannot decode {path}: {exc}") from exc
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(rgb)
    return out.transpose(0, 3, 1, 2).copy()
