"""fit() on CUDA as a GPU job runs it: channels_last, bf16 autocast, α searched once per epoch."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import xsam.training
from xsam.config import TrainConfig

pytestmark = pytest.mark.gpu


def cuda_config(**overrides) -> TrainConfig:
    """ResNet-18 (narrow) on CIFAR-shaped synthetic data: 4 steps an epoch, 2 epochs."""
    raw = {
        "model": {"name": "resnet18", "options": {"width": 8}},
        "data": {
            "name": "synthetic",
            "batch_size": 64,
            "augment": True,
            "options": {"shape": [3, 32, 32], "num_train": 256, "num_test": 64},
        },
        "optimizer": {"name": "xsam", "search_every": "epoch"},
        "schedule": {"epochs": 2},
        "resources": {"use_gpu": True},
        "precision": "bf16",
        "log_every": 1,
    } | overrides
    return TrainConfig.model_validate(raw)


@pytest.fixture
def built(monkeypatch):
    """The model fit() builds, with a hook on its first conv recording what training feeds it."""
    seen: dict[str, list] = {"model": [], "input_channels_last": [], "output_dtype": []}
    build = xsam.training.build_model

    def spy(*args, **kwargs) -> nn.Module:
        model = build(*args, **kwargs)
        conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))

        def hook(module, inputs, output) -> None:
            if module.training:
                x = inputs[0]
                seen["input_channels_last"].append(
                    x.is_contiguous(memory_format=torch.channels_last)
                )
                seen["output_dtype"].append(output.dtype)

        conv.register_forward_hook(hook)
        seen["model"].append(model)
        return model

    monkeypatch.setattr(xsam.training, "build_model", spy)
    return seen


@pytest.mark.parametrize("arm", ["xsam", "sgd"])
def test_fit_on_cuda_uses_channels_last_and_bf16(built, arm, tmp_path):
    records: list[dict] = []
    config = cuda_config(optimizer={"name": arm, "search_every": "epoch"})
    summary = fit_and_check(config, records, tmp_path)
    (model,) = built["model"]
    weights = [p for p in model.parameters() if p.ndim == 4]
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert all(p.dtype == torch.float32 for p in model.parameters()), "autocast, not bf16 weights"
    assert built["output_dtype"] and set(built["output_dtype"]) == {torch.bfloat16}
    assert all(built["input_channels_last"])
    searches = [r for r in records if r["kind"] == "event" and r["type"] == "alpha_search"]
    if arm == "xsam":
        assert [e["data"]["step"] for e in searches] == [1, 5]  # first minibatch of each epoch
        assert len(searches[0]["data"]["losses"]) == 21
        assert all(math.isfinite(v) for v in searches[0]["data"]["losses"])
        assert summary["alpha"] is not None
    else:
        assert searches == []


def fit_and_check(config: TrainConfig, records: list[dict], tmp_path) -> dict:
    summary = xsam.training.fit(config, report=records.append, data_root=tmp_path)
    assert summary["status"] == "completed", summary
    assert summary["epochs_completed"] == 2 and summary["steps"] == 8
    for name, value in summary["metrics"].items():
        assert math.isfinite(value), (name, value)
    assert "test/acc" in summary["metrics"]
    started = next(r for r in records if r["kind"] == "event" and r["type"] == "started")
    assert started["data"]["device"].startswith("cuda")
    return summary
