"""Evaluation of a model on a data set's splits, and the trained-weights file fit() writes.

Metric names: ``test/loss`` and ``test/acc`` are the test set (reported, never used to choose
anything); ``val/loss`` and ``val/acc`` are the validation set held out of the training set by
``data.val_fraction`` (xsam/val_split.py), present only when it is set. Before the validation
split existed the test set was reported as ``val/*``; migration 0004 renames those stored series.

`evaluate` gives the numbers fit() reports; `load_trained` rebuilds a model from a
``weights_out`` file (the agent serves it as the job's model artifact), so that
``evaluate(load_trained(path), dataset)`` reproduces the run's final ``test/acc``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from xsam.config import TrainConfig
from xsam.data import Dataset
from xsam.errors import ModelError
from xsam.models import build_model

EVAL_BATCH = 1000


def weights_file(model: nn.Module, config: TrainConfig, dataset: Dataset, metrics: dict) -> dict:
    """The content of a ``weights_out`` file."""
    return {
        "state_dict": model.state_dict(),
        "config": config.model_dump(mode="json"),
        "input_shape": list(dataset.input_shape),
        "num_classes": dataset.num_classes,
        "metrics": dict(metrics),
    }


@torch.no_grad()
def _eval_sums(model, x, y, autocast, channels_last, batch_size=EVAL_BATCH):
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, len(y), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast():
            out = model(xb)
        loss_sum += F.cross_entropy(out.float(), yb, reduction="sum").double()
        correct += (out.argmax(1) == yb).sum().double()
    return loss_sum, correct


def evaluate_ranks(model, data, autocast, channels_last, distributed, rank, world):
    if distributed:
        # Sync point: BN running statistics drift per rank; evaluate (and save) rank 0's.
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
    was_training = model.training
    model.eval()
    splits = [("test", data.x_test, data.y_test)]
    if data.x_val is not None and data.y_val is not None:
        splits.append(("val", data.x_val, data.y_val))
    parts = []
    for _, x, y in splits:
        parts.extend(_eval_sums(model, x[rank::world], y[rank::world], autocast, channels_last))
    sums = torch.stack(parts)
    if distributed:
        # Sync point: each rank scored a disjoint slice of every split (one all-reduce for all).
        device = data.x_test.device
        backend_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
        sums = sums.to(backend_device)
        dist.all_reduce(sums)
    model.train(was_training)
    values: dict[str, float] = {}
    for i, (split, _, y) in enumerate(splits):
        values[f"{split}/loss"] = float(sums[2 * i]) / len(y)
        values[f"{split}/acc"] = float(sums[2 * i + 1]) / len(y)
    return values


def accuracy_summary(accuracies: list[float]) -> dict[str, float]:
    """``test/acc_best`` and ``test/acc_last5`` over the evaluations so far, oldest first.

    The paper's authors report the best test accuracy of a run and the mean of its last five
    evaluations (fewer when there were fewer); with ``eval_every`` N these are evaluations,
    not epochs.
    """
    if not accuracies:
        raise ValueError("accuracies: need at least one evaluation (got an empty list)")
    last5 = accuracies[-5:]
    return {"test/acc_best": max(accuracies), "test/acc_last5": sum(last5) / len(last5)}


def evaluate(
    model: nn.Module, dataset: Dataset, *, batch_size: int = EVAL_BATCH, split: str = "test"
) -> dict[str, float]:
    """Loss and accuracy of ``model`` (in eval mode) on a data set split, on the model's device.

    Returns ``{"<split>/loss", "<split>/acc"}``: for ``test`` and ``val`` the numbers fit()
    reports under those names.
    """
    if split not in ("test", "val", "train"):
        raise ValueError(f"split must be 'test', 'val' or 'train' (got {split!r})")
    x, y = {
        "test": (dataset.x_test, dataset.y_test),
        "val": (dataset.x_val, dataset.y_val),
        "train": (dataset.x_train, dataset.y_train),
    }[split]
    if x is None or y is None:
        raise ValueError("the data set has no validation split (data.val_fraction is 0)")
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    was_training = model.training
    model.eval()
    loss_sum, correct = _eval_sums(model, x, y, contextlib.nullcontext, False, batch_size)
    model.train(was_training)
    return {f"{split}/loss": float(loss_sum) / len(y), f"{split}/acc": float(correct) / len(y)}


def load_trained(path: str | os.PathLike, *, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the model a ``weights_out`` file describes and load its weights (eval mode)."""
    try:
        saved = torch.load(Path(path), map_location=device, weights_only=True)
    except FileNotFoundError as exc:
        raise ModelError(f"no trained weights at {path}") from exc
    if not isinstance(saved, dict) or "state_dict" not in saved:
        raise ModelError(f"{path} is not a file written by fit(weights_out=...)")
    config = TrainConfig.model_validate(saved["config"])
    model = build_model(
        config, input_shape=tuple(saved["input_shape"]), num_classes=int(saved["num_classes"])
    )
    model.load_state_dict(saved["state_dict"])
    return model.to(device).eval()
