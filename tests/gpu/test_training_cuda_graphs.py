"""cuda_graphs on CUDA: replayed steps equal eager ones, and fit() trains the same weights."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import xsam.training
from xsam.checkpoint import load_checkpoint
from xsam.config import TrainConfig
from xsam.cuda_graph import GraphedStep
from xsam.optim import XSAM

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(autouse=True)
def deterministic_cudnn(monkeypatch):
    # Same algorithms in both runs, so eager and replay differ by nothing but the launch.
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)


# -- one step at a time, fp32 --------------------------------------------------------------------


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).cuda()


def arm(name: str, model: nn.Module):
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    if name == "sgd":
        return base, base
    return base, XSAM(model.parameters(), base, rho=0.1, alpha=0.5, model=model)


def state(model: nn.Module, base: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [t.detach().clone() for t in model.state_dict().values()]
    return tensors + [s["momentum_buffer"].clone() for s in base.state.values()]


@pytest.mark.parametrize("name", ["sgd", "xsam"])
def test_replayed_steps_equal_eager_steps_in_fp32(name):
    eager_model, graph_model = small_cnn(), small_cnn()
    eager_base, eager_opt = arm(name, eager_model)
    graph_base, graph_opt = arm(name, graph_model)
    eager_sched = torch.optim.lr_scheduler.StepLR(eager_base, step_size=1, gamma=0.5)
    graph_sched = torch.optim.lr_scheduler.StepLR(graph_base, step_size=1, gamma=0.5)
    nocast = contextlib.nullcontext

    def graph_fn(x, y, search):
        return xsam.training._train_step(graph_model, graph_base, graph_opt, x, y, nocast, search)

    graphed = GraphedStep(graph_fn, graph_opt, batch_size=16, device=torch.device("cuda"), warmup=2)
    gen = torch.Generator().manual_seed(1)
    for i in range(14):
        x = torch.randn(16, 3, 8, 8, generator=gen).cuda()
        y = torch.randint(0, 4, (16,), generator=gen).cuda()
        if i in (6, 10):  # an epoch ends: the LR moves; at 10 α moves too (as a search would)
            eager_sched.step()
            graph_sched.step()
            if name == "xsam" and i == 10:
                eager_opt.alpha = graph_opt.alpha = 0.8
        loss_e, correct_e, finite_e = xsam.training._train_step(
            eager_model, eager_base, eager_opt, x, y, nocast, False
        )
        loss_g, correct_g, finite_g = graphed.step(x, y, False)
        torch.testing.assert_close(loss_g, loss_e, rtol=1e-6, atol=1e-6)
        assert int(correct_g) == int(correct_e) and bool(finite_g) and bool(finite_e)
        for g, e in zip(
            state(graph_model, graph_base), state(eager_model, eager_base), strict=True
        ):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=f"step {i}")
    # 2 warm-ups, a capture at step 2, re-captures at the LR steps 6 and 10; replays between.
    assert graphed.counts == {"eager": 0, "warmup": 2, "capture": 3, "replay": 9}
    if name == "xsam":
        assert graph_opt.steps_taken == eager_opt.steps_taken == 14
        for key in ("phi", "grad_norm", "ascent_grad_norm", "clean_loss"):
            torch.testing.assert_close(
                graph_opt.last_stats[key], eager_opt.last_stats[key], rtol=1e-5, atol=1e-6
            )


# -- fit(), bf16, with α searches and a cosine LR ------------------------------------------------


def cuda_config(cuda_graphs: bool) -> TrainConfig:
    """Narrow ResNet-18, 544 images at batch 64: 8 full steps and a short one per epoch."""
    return TrainConfig.model_validate(
        {
            "model": {"name": "resnet18", "options": {"width": 8}},
            "data": {
                "name": "synthetic",
                "batch_size": 64,
                "augment": True,
                "options": {"shape": [3, 32, 32], "num_train": 544, "num_test": 64},
            },
            "optimizer": {"name": "xsam", "alpha": "dynamic", "search_every": "epoch"},
            "schedule": {"epochs": 3, "lr_schedule": "cosine"},
            "resources": {"use_gpu": True},
            "precision": "bf16",
            "log_every": 4,
            "cuda_graphs": cuda_graphs,
        }
    )


@pytest.fixture
def graphed_steps(monkeypatch):
    made: list[GraphedStep] = []

    class Recorded(GraphedStep):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(xsam.training, "GraphedStep", Recorded)
    return made


def train(cuda_graphs: bool, tmp_path) -> tuple[dict, list[dict], dict]:
    records: list[dict] = []
    ckpt = tmp_path / ("graphs" if cuda_graphs else "eager")
    summary = xsam.training.fit(
        cuda_config(cuda_graphs), report=records.append, data_root=tmp_path, checkpoint_dir=ckpt
    )
    assert summary["status"] == "completed", summary
    return summary, records, load_checkpoint(ckpt)


def test_fit_with_cuda_graphs_trains_the_eager_weights(graphed_steps, tmp_path):
    summary_e, records_e, ckpt_e = train(False, tmp_path)
    assert graphed_steps == []
    summary_g, records_g, ckpt_g = train(True, tmp_path)
    (graphed,) = graphed_steps
    # Per epoch: the search and the short batch eager, one capture; 3 warm-ups in epoch 1.
    assert graphed.counts == {"eager": 6, "warmup": 3, "capture": 3, "replay": 15}
    assert summary_g["steps"] == summary_e["steps"] == 27

    def searches(records):
        return [
            (r["data"]["step"], r["data"]["alpha"])
            for r in records
            if r["kind"] == "event" and r["type"] == "alpha_search"
        ]

    assert [s for s, _ in searches(records_g)] == [1, 10, 19]
    assert searches(records_g) == searches(records_e)  # bf16 noise too small to flip an α
    assert ckpt_g["optimizer"]["xsam"] == ckpt_e["optimizer"]["xsam"]  # steps_taken, α
    for key, e in ckpt_e["model"].items():
        g = ckpt_g["model"][key]
        if e.is_floating_point():
            rel = (g - e).norm() / e.norm().clamp_min(1e-12)
            assert rel < 2e-2, (key, float(rel))
        else:
            assert torch.equal(g, e), key  # num_batches_tracked
    # The train loss the loop reads from the graph's outputs matches eager's.
    loss = {
        name: [
            r["values"]["train/loss"]
            for r in recs
            if r["kind"] == "metrics" and "train/loss" in r["values"]
        ]
        for name, recs in (("eager", records_e), ("graphs", records_g))
    }
    assert len(loss["graphs"]) == len(loss["eager"]) > 0
    for g, e in zip(loss["graphs"], loss["eager"], strict=True):
        assert abs(g - e) <= 2e-2 * max(1.0, abs(e)), (g, e)
