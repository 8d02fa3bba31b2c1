"""cuda_graphs: the switch is validated, and the capture plan re-captures exactly when it must.

The capture itself needs a GPU (tests/gpu/test_training_cuda_graphs.py); here the pure bookkeeping.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import xsam.training as training
from xsam.checkpoint import load_checkpoint
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
    opt._searched_alpha = 0.7  # what a search sets (`alpha` is read-only)
    assert graph_key(opt, x, y) != after_lr
    assert graph_key(opt, x[:5], y[:5]) != graph_key(opt, x, y)
    x4 = torch.randn(8, 3, 4, 4)
    assert graph_key(opt, x4, y) != graph_key(
        opt, x4.contiguous(memory_format=torch.channels_last), y
    )


# -- the whole loop, with a CPU stand-in for CUDA graphs -----------------------------------------


class _Stream:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass


class _Graph:
    """Replays by running the captured step again on the static inputs (see `_stand_in`)."""

    def __init__(self) -> None:
        self.run = None

    def replay(self) -> None:
        self.run()


def _stand_in(monkeypatch, tracked):
    """torch.cuda's streams and graphs, emulated on the CPU: a capture runs the step and then
    puts every tracked tensor back (a real capture runs nothing); a replay runs the step again
    and writes its results into the captured outputs (a real replay refills them)."""
    capturing: list[_Graph] = []

    class graph:
        def __init__(self, g, pool=None, stream=None) -> None:
            self.g = g

        def __enter__(self) -> None:
            self.saved = [t.detach().clone() for t in tracked()]
            capturing.append(self.g)

        def __exit__(self, *exc) -> None:
            capturing.pop()
            with torch.no_grad():
                for t, s in zip(tracked(), self.saved, strict=True):  # nothing allocated
                    t.copy_(s)

    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _Stream())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)

    def wrap(fn, opt):
        def step(x, y, search):
            out = fn(x, y, search)
            if capturing:
                stats = dict(opt.last_stats) if hasattr(opt, "last_stats") else {}

                def run() -> None:
                    taken = getattr(opt, "steps_taken", None)
                    new = fn(x, y, search)
                    if taken is not None:
                        opt.steps_taken = taken  # a real replay runs no Python
                    for o, n in zip(out, new, strict=True):
                        o.copy_(n)
                    for k, v in (opt.last_stats if stats else {}).items():
                        if isinstance(v, torch.Tensor):
                            stats[k].copy_(v)

                capturing[-1].run = run
            return out

        return step

    return wrap


@pytest.mark.parametrize("arm", ["xsam", "sgd"])
def test_graphed_loop_trains_exactly_as_eager_with_a_stand_in_for_cuda(monkeypatch, tmp_path, arm):
    made: list[GraphedStep] = []

    def graphed_on_cpu(config, device, distributed, world, net, base, opt, autocast, batch):
        if not config.cuda_graphs:
            return None

        def tracked() -> list[torch.Tensor]:
            ts = [*net.parameters(), *net.buffers()]
            ts += [p.grad for p in net.parameters() if p.grad is not None]
            ts += [s["momentum_buffer"] for s in base.state.values()]
            return ts + (opt._theta0 + opt._disp + opt._norm_saved if opt is not base else [])

        wrap = _stand_in(monkeypatch, tracked)
        step = wrap(lambda x, y, s: training._train_step(net, base, opt, x, y, autocast, s), opt)
        made.append(GraphedStep(step, opt, batch_size=batch, device=torch.device("cuda")))
        return made[-1]

    monkeypatch.setattr(training, "_graphed_step", graphed_on_cpu)
    raw = {
        **RAW,
        "data": {"name": "mnist1d", "batch_size": 50, "num_train": 430},  # 8 full + 1 short
        "optimizer": {"name": arm, "lr": 0.05, "rho": 0.05},
        "schedule": {"epochs": 3},
        "log_every": 4,
    }
    runs = {}
    for graphs in (False, True):
        records: list[dict] = []
        config = TrainConfig.model_validate({**raw, "cuda_graphs": graphs})
        ckpt = tmp_path / str(graphs)
        summary = fit(config, report=records.append, data_root=tmp_path, device="cpu",
                      checkpoint_dir=ckpt)  # fmt: skip
        metrics = [
            {k: v for k, v in r["values"].items() if not k.startswith("throughput")}
            for r in records
            if r["kind"] == "metrics"
        ]
        runs[graphs] = (summary, metrics, load_checkpoint(ckpt))
    (graphed,) = made
    searches = 3 if arm == "xsam" else 0
    assert graphed.counts == {
        "eager": 3 + searches, "warmup": 3, "capture": 3, "replay": 18 - searches,
    }  # fmt: skip
    (summary_e, metrics_e, ckpt_e), (summary_g, metrics_g, ckpt_g) = runs[False], runs[True]
    assert summary_g["metrics"] == summary_e["metrics"]
    assert metrics_g == metrics_e  # loss, accuracy, lr and XSAM's telemetry, every report
    assert ckpt_g["optimizer"].get("xsam") == ckpt_e["optimizer"].get("xsam")  # steps_taken
    for key, value in ckpt_e["model"].items():
        assert torch.equal(ckpt_g["model"][key], value), key
