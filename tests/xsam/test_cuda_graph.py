"""cuda_graphs: the switch is validated, and the capture plan re-captures exactly when it must.

The capture itself needs a GPU (tests/gpu/test_training_cuda_graphs.py); here the pure bookkeeping.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from xsam.config import TrainConfig
from xsam.cuda_graph import CapturePlan, GraphedStep, graph_key
from xsam.errors import ConfigurationError
from xsam.optim import XSAM
from xsam.training import fit

RAW = {
    "model": {"name": "cnn1d", "options": {"channels": 8}},
    "data": {"name": "mnist1d", "batch_size": 50, "num_train": 400},
    "schedule": {"epochs": 1},
    "resources": {"use_gpu": True},
    "cuda_graphs": True,
}


def config(**top) -> TrainConfig:
    raw = {**RAW, **top}
    return TrainConfig.model_validate(raw)


# -- the config switch ---------------------------------------------------------------------------


def test_cuda_graphs_defaults_off_and_validates_on_one_gpu():
    assert (
        TrainConfig.model_validate({k: v for k, v in RAW.items() if k != "cuda_graphs"}).cuda_graphs
        is False
    )
    assert config().cuda_graphs is True


@pytest.mark.parametrize(
    ("top", "message"),
    [
        # on the CPU there is nothing to capture
        ({"resources": {"use_gpu": False}}, "needs resources.use_gpu: true"),
        # DDP's all-reduce in every backward is not captured
        ({"resources": {"use_gpu": True, "num_workers": 2}}, "one GPU only"),
        # torch.compile's reduce-overhead mode is its own CUDA-graph path
        ({"compile_model": True}, "not with compile_model"),
    ],
)
def test_cuda_graphs_refused_where_unsupported(top, message):
    with pytest.raises(ValidationError, match=message):
        config(**top)


def test_fit_refuses_cuda_graphs_on_a_cpu_device(tmp_path):
    with pytest.raises(ConfigurationError, match=r"^cuda_graphs: needs a CUDA device"):
        fit(config(), data_root=tmp_path, device="cpu")


def test_graphed_step_refuses_a_cpu_device():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedStep(lambda x, y, s: None, opt, batch_size=4, device=torch.device("cpu"))


# -- when to capture -----------------------------------------------------------------------------


def run(plan: CapturePlan, steps: list[tuple[str, bool, bool]]) -> list[str]:
    """Feed (key, search, full_batch) per step; return the actions."""
    return [plan.next((key,), search=s, full_batch=f) for key, s, f in steps]


def test_plan_warms_up_then_captures_once_and_replays():
    plan = CapturePlan(warmup=3)
    got = run(plan, [("lr=0.1", False, True)] * 7)
    assert got == ["warmup"] * 3 + ["capture"] + ["replay"] * 3


def test_plan_recaptures_after_an_lr_change_only():
    plan = CapturePlan(warmup=0)
    steps = [("a", False, True)] * 3 + [("b", False, True)] * 3 + [("a", False, True)]
    assert run(plan, steps) == [
        "capture", "replay", "replay",
        "capture", "replay", "replay",  # the scheduler moved lr
        "capture",  # moved back: still a new capture (one live graph)
    ]  # fmt: skip


def test_plan_runs_searches_eagerly_and_recaptures_after_each():
    plan = CapturePlan(warmup=0)
    # One search per epoch on the first batch; α (in the key) unchanged by the second search.
    steps = [("a", True, True), ("a", False, True), ("a", False, True)] * 2
    assert run(plan, steps) == ["eager", "capture", "replay"] * 2


def test_plan_search_during_warmup_is_not_a_warmup_step():
    plan = CapturePlan(warmup=2)
    steps = [("a", True, True), ("a", False, True), ("a", False, True), ("a", False, True)]
    assert run(plan, steps) == ["eager", "warmup", "warmup", "capture"]


def test_plan_short_batch_runs_eagerly_and_keeps_the_graph():
    plan = CapturePlan(warmup=0)
    steps = [("a", False, True), ("a", False, True), ("a", False, False), ("a", False, True)]
    assert run(plan, steps) == ["capture", "replay", "eager", "replay"]


def test_plan_forget_forces_a_capture():
    plan = CapturePlan(warmup=0)
    assert run(plan, [("a", False, True)] * 2) == ["capture", "replay"]
    plan.forget()
    assert run(plan, [("a", False, True)] * 2) == ["capture", "replay"]


def test_plan_rejects_a_negative_warmup():
    with pytest.raises(ValueError, match="warmup"):
        CapturePlan(warmup=-1)


# -- what the key covers -------------------------------------------------------------------------


def xsam_and_scheduler():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt = XSAM(model.parameters(), base, rho=0.1, alpha="dynamic", model=model)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=4)
    return opt, base, scheduler


def test_key_changes_with_lr_alpha_and_input_layout_and_nothing_else():
    opt, base, scheduler = xsam_and_scheduler()
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    key = graph_key(opt, x, y)
    assert graph_key(opt, x.clone(), y.clone()) == key  # other data, same layout: replay
    assert graph_key(base, x, y) != key  # the base optimizer has no α
    base.step()
    scheduler.step()  # an epoch's LR step
    after_lr = graph_key(opt, x, y)
    assert after_lr != key
    opt.alpha = 0.7  # what a search sets
    assert graph_key(opt, x, y) != after_lr
    assert graph_key(opt, x[:5], y[:5]) != graph_key(opt, x, y)
    x4 = torch.randn(8, 3, 4, 4)
    assert graph_key(opt, x4, y) != graph_key(
        opt, x4.contiguous(memory_format=torch.channels_last), y
    )
