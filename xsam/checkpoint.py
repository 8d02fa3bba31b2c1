"""Training checkpoints on disk: one ``checkpoint.pt`` per run directory, replaced atomically.

A checkpoint holds everything `xsam.training.fit` needs to continue exactly where it stopped:
model weights, optimizer state (base SGD momentum + XSAM's α and counters), LR scheduler, the
position (epoch, batch within the epoch, global step), the metrics so far, and every rank's
torch RNG states. Batch order and augmentation are functions of (seed, epoch, step, rank), so
they need no saved state.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

from xsam.errors import ConfigurationError, StorageError

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file beside ``path``, then rename: readers never see half.

    Raises `StorageError` (naming the path and the reason) when the file cannot be written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise StorageError.writing(path, exc) from exc
    except RuntimeError as exc:
        # torch's zip writer reports a failed write (a full disk) as a RuntimeError.
        if "PytorchStreamWriter" not in str(exc):
            raise
        raise StorageError.writing(path, exc) from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path


def checkpoint_path(checkpoint_dir: str | os.PathLike) -> Path:
    return Path(checkpoint_dir) / CHECKPOINT_NAME


def load_checkpoint(path_or_dir: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint file, or ``checkpoint.pt`` inside a directory, onto the CPU."""
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise ConfigurationError(f"resume_from: no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise ConfigurationError(f"resume_from: {path} is not an xsam checkpoint")
    return state


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
