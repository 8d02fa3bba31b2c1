"""fit(): learns, reports per docs/internals.md, resumes exactly, stops, diverges loudly, DDP."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from process_support import free_port, run_ranks

from xsam.config import TrainConfig
from xsam.data import load_dataset
from xsam.errors import DivergedError
from xsam.training import evaluate, fit, load_trained

ROOT = Path(__file__).resolve().parents[2]

BASE = {
    "model": {"name": "cnn1d", "options": {"channels": 8}},
    "data": {"name": "mnist1d", "batch_size": 50, "num_train": 400},
    "optimizer": {"name": "xsam", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "rho": 0.05},
    "schedule": {"epochs": 3},
    "log_every": 4,
}


def make_config(**sections) -> TrainConfig:
    raw = json.loads(json.dumps(BASE))
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return TrainConfig.model_validate(raw)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    load_dataset("mnist1d", data_root=root)  # generate the cache once (~3 s)
    return root


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def weights(path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.slow
def test_short_mnist1d_run_learns(data_root):
    # Full MNIST-1D, default cnn1d, XSAM: 4 epochs reach ~0.75 (measured); 0.6 leaves margin.
    config = make_config(
        model={"options": {}}, data={"num_train": None, "batch_size": 125}, schedule={"epochs": 4}
    )
    summary = fit(config, data_root=data_root)
    assert summary["status"] == "completed" and summary["steps"] == 4 * 32
    assert summary["metrics"]["test/acc"] > 0.6, summary


def test_reports_follow_the_contract_and_weights_reload(data_root, tmp_path):
    records = []
    config = make_config(schedule={"epochs": 2})
    summary = fit(config, report=records.append, data_root=data_root, weights_out=tmp_path / "m.pt")
    events = [r for r in records if r["kind"] == "event"]
    metrics = [r for r in records if r["kind"] == "metrics"]
    assert events[0]["type"] == "started" and events[-1]["type"] == "finished"
    assert [e["key"] for e in events if e["type"] == "epoch_done"] == [
        "epoch_done:1",
        "epoch_done:2",
    ]
    searches = [e for e in events if e["type"] == "alpha_search"]
    assert [e["data"]["step"] for e in searches] == [1, 9]  # first minibatch of each epoch
    assert len(searches[0]["data"]["losses"]) == len(searches[0]["data"]["alphas"]) == 21
    train = [m for m in metrics if "train/loss" in m["values"]]
    assert [m["step"] for m in train] == [4, 8, 12, 16]  # every log_every and each epoch's end
    assert set(train[0]["values"]) == {
        "train/loss",
        "train/acc",
        "lr",
        "throughput/samples_per_s",
        "xsam/phi",
        "xsam/alpha",
        "xsam/grad_norm",
        "xsam/ascent_grad_norm",
        "xsam/sharpness",
    }
    assert [m["epoch"] for m in train] == [1, 1, 2, 2]
    val = [m["values"] for m in metrics if "test/acc" in m["values"]]
    assert len(val) == 2 and val[-1]["test/acc"] == summary["metrics"]["test/acc"]
    assert summary["alpha"] == searches[-1]["data"]["alpha"]
    assert set(summary) >= {"status", "epochs_completed", "steps", "metrics", "fit_seconds"}

    model = load_trained(tmp_path / "m.pt")
    again = evaluate(model, load_dataset(config, data_root=data_root))
    assert again["test/acc"] == summary["metrics"]["test/acc"]
    assert again["test/loss"] == pytest.approx(summary["metrics"]["test/loss"], rel=1e-6)


def test_val_fraction_reports_the_held_out_split_as_val_and_the_test_set_as_test(
    data_root, tmp_path
):
    records = []
    config = make_config(data={"val_fraction": 0.25}, schedule={"epochs": 1})
    summary = fit(config, report=records.append, data_root=data_root, weights_out=tmp_path / "m.pt")
    started = next(r for r in records if r.get("type") == "started")
    assert started["data"]["num_val"] == 100 and started["data"]["num_train"] == 300
    assert {"val/acc", "val/loss", "test/acc", "test/loss"} <= set(summary["metrics"])
    model, data = load_trained(tmp_path / "m.pt"), load_dataset(config, data_root=data_root)
    assert evaluate(model, data, split="val")["val/acc"] == summary["metrics"]["val/acc"]
    assert evaluate(model, data)["test/acc"] == summary["metrics"]["test/acc"]


def test_sgd_reports_only_train_metrics(data_root):
    records = []
    fit(
        make_config(optimizer={"name": "sgd"}, schedule={"epochs": 1}),
        report=records.append,
        data_root=data_root,
    )
    train = [r for r in records if r["kind"] == "metrics" and "train/loss" in r["values"]]
    assert set(train[0]["values"]) == {"train/loss", "train/acc", "lr", "throughput/samples_per_s"}
    assert not any(r.get("type") == "alpha_search" for r in records)


def test_crash_after_an_epoch_resumes_exactly(data_root, tmp_path):
    config = make_config()  # XSAM, α searched every epoch, 3 epochs
    fit(config, data_root=data_root, weights_out=tmp_path / "full.pt")

    def crash_after_epoch_2(path, info):
        if info["epoch"] == 2:
            shutil.copy(path, tmp_path / "after2.pt")
            raise RuntimeError("node lost")

    with pytest.raises(RuntimeError, match="node lost"):
        fit(
            config,
            data_root=data_root,
            checkpoint_dir=tmp_path / "c",
            on_checkpoint=crash_after_epoch_2,
        )
    summary = fit(
        config,
        data_root=data_root,
        resume_from=tmp_path / "after2.pt",
        weights_out=tmp_path / "resumed.pt",
    )
    assert summary["epochs_completed"] == 3 and summary["steps"] == 24
    assert state_dicts_equal(weights(tmp_path / "full.pt"), weights(tmp_path / "resumed.pt"))


def test_stop_mid_epoch_then_resume_exactly(data_root, tmp_path):
    # α searched every 3 steps: the stop at step 13 falls between two searches, mid-epoch 2.
    config = make_config(optimizer={"search_every": 3})
    full = fit(config, data_root=data_root, weights_out=tmp_path / "full.pt")

    polls = []

    def should_stop():
        polls.append(1)
        return len(polls) == 13

    records, checkpoints = [], []
    stopped = fit(
        config,
        data_root=data_root,
        report=records.append,
        should_stop=should_stop,
        checkpoint_dir=tmp_path / "c",
        weights_out=tmp_path / "never.pt",
        on_checkpoint=lambda path, info: checkpoints.append(info),
    )
    assert stopped["status"] == "stopped" and stopped["steps"] == 13
    assert stopped["epochs_completed"] == 1
    assert checkpoints[-1]["position"] == [1, 5]  # epoch index 1, five batches done
    assert records[-1]["type"] == "stopped"
    assert not (tmp_path / "never.pt").exists()  # weights_out is for finished runs

    resumed = fit(
        config, data_root=data_root, resume_from=tmp_path / "c", weights_out=tmp_path / "resumed.pt"
    )
    assert resumed["steps"] == 24 and resumed["alpha"] == full["alpha"]
    assert resumed["metrics"]["test/acc"] == full["metrics"]["test/acc"]
    assert state_dicts_equal(weights(tmp_path / "full.pt"), weights(tmp_path / "resumed.pt"))


def test_divergence_names_the_step(data_root):
    config = make_config(
        model={"name": "mlp", "options": {"hidden": [16]}},
        data={"name": "synthetic", "options": {"shape": [20], "num_train": 200}},
        optimizer={"name": "sgd", "lr": 1e12},
    )
    with pytest.raises(DivergedError, match=r"at step \d+ \(epoch 1\)"):
        fit(config, data_root=data_root)


def test_fake_cifar_trains_with_augmentation(tmp_path):
    from test_data import write_fake_cifar

    write_fake_cifar(tmp_path / "c10")
    config = make_config(
        model={"name": "resnet18", "options": {"width": 4}},
        data={"name": "cifar10", "root": "c10", "batch_size": 10, "num_train": None},
        optimizer={"name": "sam"},
        schedule={"epochs": 1},
    )
    summary = fit(config, data_root=tmp_path)
    assert summary["status"] == "completed" and summary["steps"] == 3
    assert 0 <= summary["metrics"]["test/acc"] <= 1


@pytest.mark.gpu
def test_cuda_bf16_channels_last_trains(tmp_path):
    from test_data import write_fake_cifar

    write_fake_cifar(tmp_path / "c10")
    config = make_config(
        model={"name": "resnet18", "options": {"width": 8}},
        data={"name": "cifar10", "root": "c10", "batch_size": 10, "num_train": None},
        resources={"use_gpu": True},
        precision="bf16",
        schedule={"epochs": 2},
    )
    summary = fit(config, data_root=tmp_path, weights_out=tmp_path / "m.pt")
    assert summary["status"] == "completed" and summary["steps"] == 6
    model = load_trained(tmp_path / "m.pt", device="cuda")
    assert next(model.parameters()).dtype == torch.float32  # autocast, fp32 weights


# --- DDP: two gloo ranks in spawned processes -------------------------------------------


def _ddp_rank(rank, world, port, out, data_root):
    import xsam.training as training
    from xsam.distributed import process_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    built = []
    real_build = training.build_model

    def capture(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]

    training.build_model = capture  # keep a handle on this rank's model
    records = []
    with process_group("gloo", rank=rank, world_size=world, timeout_s=60):
        summary = training.fit(
            make_config(schedule={"epochs": 2}), report=records.append, data_root=data_root
        )
        torch.save(
            {"state": built[0].state_dict(), "alpha": summary["alpha"], "records": records},
            Path(out) / f"rank{rank}.pt",
        )


def test_fit_releases_its_ddp_reducer_even_when_it_raises(data_root):
    """The traceback of fit's exception keeps its frame, and so its DDP module, alive. Were the
    module's Reducer still there when the caller (a test, Ray Train) destroys the process group,
    the Reducer would hold the group's last reference and destroy it later with the GIL held:
    the rank hangs at exit. fit releases the Reducer on the way out instead."""
    from torch.nn.parallel import DistributedDataParallel

    from xsam.distributed import process_group

    config = make_config(
        model={"name": "mlp", "options": {"hidden": [8]}},
        data={"name": "synthetic", "options": {"shape": [20], "num_train": 200}},
        optimizer={"name": "sgd", "lr": 1e12},
    )
    init = f"tcp://127.0.0.1:{free_port()}"
    with process_group("gloo", rank=0, world_size=1, init_method=init, timeout_s=30):
        with pytest.raises(DivergedError) as caught:
            fit(config, data_root=data_root)
        alive = [o for o in gc.get_objects() if isinstance(o, DistributedDataParallel)]
        assert alive, "the traceback should still reach fit's DDP module"
        assert all(getattr(net, "reducer", None) is None for net in alive)
        del caught


def _diverging_ddp_rank(rank, world, port, data_root):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    config = make_config(
        model={"name": "mlp", "options": {"hidden": [8]}},
        data={"name": "synthetic", "options": {"shape": [20], "num_train": 200}},
        optimizer={"name": "sgd", "lr": 1e12},
    )
    # The bare torch calls, as Ray Train's TorchConfig makes them around a rank's loop: only
    # fit's own release of its DDP module stands between this rank and a hang at exit.
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fit(config, data_root=data_root)
    except DivergedError as exc:
        kept = exc  # as Ray Train keeps a rank's error: fit's frame stays reachable
    dist.destroy_process_group()
    assert kept.__traceback__ is not None


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_ranks_of_a_failed_ddp_fit_exit(data_root):
    """Both ranks diverge, keep the exception, destroy the group and must exit (not hang)."""
    run_ranks(_diverging_ddp_rank, (2, free_port(), str(data_root)), nprocs=2, timeout_s=60)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ddp_ranks_stay_identical(data_root, tmp_path):
    run_ranks(_ddp_rank, (2, free_port(), str(tmp_path), str(data_root)), nprocs=2, timeout_s=90)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    params = [k for k in r0["state"] if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in params)
    assert r0["alpha"] == r1["alpha"]
    checks = [r for r in r0["records"] if r.get("type") == "alpha_check"]
    assert len(checks) == 2 and all(c["data"]["consistent"] for c in checks)
    assert len(checks[0]["data"]["alphas"]) == 2
    assert r1["records"] == []  # only rank 0 reports
    spread = [
        r["values"]["xsam/alpha_rank_spread"]
        for r in r0["records"]
        if r["kind"] == "metrics" and "xsam/alpha_rank_spread" in r["values"]
    ]
    assert spread == [0.0, 0.0]


# --- the CLI ------------------------------------------------------------------------------


def _xsam(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "xsam", "train", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        timeout=300,
    )


@pytest.mark.slow
def test_cli_train_writes_its_outputs(data_root, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps(json.loads(json.dumps(BASE))))  # JSON is YAML
    out = tmp_path / "run"
    done = _xsam(
        str(config),
        "--out",
        str(out),
        "--data-root",
        str(data_root),
        "--epochs",
        "1",
        "--format",
        "csv",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "completed: 1 epochs, 8 steps" in done.stdout
    assert (out / "metrics.csv").read_text().startswith("step,epoch,name,value")
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert events[0]["type"] == "started" and events[-1]["type"] == "finished"
    assert load_trained(out / "model.pt") is not None
    assert (out / "checkpoint.pt").exists()


def test_cli_bad_config_exits_2_naming_the_field(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model: {name: cnn1d}\ndata: {name: mnist1d, batch_size: 0}\n")
    done = _xsam(str(config), cwd=tmp_path)
    assert done.returncode == 2
    assert "data.batch_size" in done.stderr and "Traceback" not in done.stderr


# --- the LR schedule -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "factors"),
    [
        ({"epochs": 4, "lr_schedule": "cosine"}, [1.0, 0.853553, 0.5, 0.146447]),
        ({"epochs": 4, "lr_schedule": "step"}, [1.0, 1.0, 0.1, 0.01]),
        ({"epochs": 4, "lr_schedule": "constant"}, [1.0] * 4),
        # warm-up from lr/2, then cosine over the remaining 3 epochs
        ({"epochs": 5, "lr_schedule": "cosine", "warmup_epochs": 2}, [0.5, 1.0, 1.0, 0.75, 0.25]),
    ],
)
def test_lr_schedule_per_epoch(schedule, factors):
    from xsam.config import ScheduleConfig
    from xsam.schedules import build_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = build_scheduler(opt, ScheduleConfig(**schedule))
    seen = []
    for _ in factors:
        seen.append(opt.param_groups[0]["lr"] / 0.1)
        opt.step()
        scheduler.step()
    assert seen == pytest.approx(factors, abs=1e-6)
