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
from host_syncs import count_host_syncs
from process_support import free_port, run_ranks
from pydantic import ValidationError

import xsam.training as training
from xsam.config import TrainConfig
from xsam.data import epoch_shard, load_dataset
from xsam.errors import ConfigurationError, DivergedError
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
    # The paper reports the best and the mean of the last five test accuracies as well.
    accs = [v["test/acc"] for v in val]
    assert val[-1]["test/acc_best"] == summary["metrics"]["test/acc_best"] == max(accs)
    assert val[-1]["test/acc_last5"] == pytest.approx(sum(accs) / 2)
    assert summary["metrics"]["test/acc_last5"] == val[-1]["test/acc_last5"]
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


@pytest.mark.parametrize(
    ("accuracies", "best", "last5"),
    [
        ([0.5], 0.5, 0.5),  # one evaluation
        ([0.1, 0.9, 0.3], 0.9, 13 / 30),  # fewer than five: the mean of all
        ([0.2, 0.95, 0.4, 0.5, 0.6, 0.7, 0.8], 0.95, 0.6),  # the best is not among the last 5
    ],
)
def test_best_and_last5_accuracies(accuracies, best, last5):
    from xsam.evaluation import accuracy_summary

    summary = accuracy_summary(accuracies)
    assert summary["test/acc_best"] == best
    assert summary["test/acc_last5"] == pytest.approx(last5)


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
    # A single process stops at the very step it is asked to; the partial window is not
    # reported, so the resumed run's train series keeps its log_every spacing.
    train_steps = [
        r["step"] for r in records if r["kind"] == "metrics" and "train/loss" in r["values"]
    ]
    assert train_steps == [4, 8, 12]
    assert not (tmp_path / "never.pt").exists()  # weights_out is for finished runs

    resumed = fit(
        config, data_root=data_root, resume_from=tmp_path / "c", weights_out=tmp_path / "resumed.pt"
    )
    assert resumed["steps"] == 24 and resumed["alpha"] == full["alpha"]
    for name in ("test/acc", "test/acc_best", "test/acc_last5"):  # the history is checkpointed
        assert resumed["metrics"][name] == full["metrics"][name], name
    assert state_dicts_equal(weights(tmp_path / "full.pt"), weights(tmp_path / "resumed.pt"))


def test_divergence_names_the_step(data_root):
    config = make_config(
        model={"name": "mlp", "options": {"hidden": [16]}},
        data={"name": "synthetic", "options": {"shape": [20], "num_train": 200}},
        optimizer={"name": "sgd", "lr": 1e9},
    )
    with pytest.raises(DivergedError, match=r"at step \d+ \(epoch 1\)"):
        fit(config, data_root=data_root)


# --- the steady state never waits for the host --------------------------------------------


@pytest.mark.parametrize("arm", ["xsam", "sgd"])
def test_steady_state_steps_make_no_host_sync(data_root, monkeypatch, arm):
    # Counted between the starts of consecutive steps: a step that is neither a read point
    # (every log_every steps, each epoch's last) nor an α search reads nothing back.
    marks = []
    real_step = training._train_step

    def marked_step(*args, **kwargs):
        marks.append(counts.total)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(training, "_train_step", marked_step)
    config = make_config(optimizer={"name": arm}, schedule={"epochs": 2})  # 8 steps per epoch
    with count_host_syncs() as counts:
        fit(config, data_root=data_root, should_stop=lambda: False)
    marks.append(counts.total)
    per_step = {step: marks[step] - marks[step - 1] for step in range(1, len(marks))}
    reads = {4, 8, 12, 16}
    searches = {1, 9} if arm == "xsam" else set()
    steady = {step: n for step, n in per_step.items() if step not in reads | searches}
    assert steady == dict.fromkeys(steady, 0), per_step
    assert len(steady) == 16 - len(reads | searches)
    assert all(per_step[step] > 0 for step in reads)  # the counter does see the reads


# --- numerical guards ------------------------------------------------------------------------


@pytest.mark.parametrize("arm", ["xsam", "sgd"])
def test_a_non_finite_step_fails_diverged_and_is_never_checkpointed(
    data_root, tmp_path, monkeypatch, arm
):
    # A NaN sample appears in epoch 2's sixth batch (step 14), between two reads (12 and 16).
    config = make_config(optimizer={"name": arm}, schedule={"epochs": 3})
    loaded, built = [], []
    real_load, real_build = training.load_dataset, training.build_model
    monkeypatch.setattr(
        training, "load_dataset", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1]
    )
    monkeypatch.setattr(
        training, "build_model", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1]
    )
    shard = epoch_shard(400, 1, seed=config.seed)
    checkpoints = []

    def poison_after_epoch_1(path, info):
        checkpoints.append(info["epoch"])
        if info["epoch"] == 1:
            loaded[0].x_train[shard[5 * 50]] = float("nan")

    with pytest.raises(DivergedError, match=r"at step 14 \(epoch 2\)"):
        fit(
            config,
            data_root=data_root,
            checkpoint_dir=tmp_path,
            on_checkpoint=poison_after_epoch_1,
        )
    assert checkpoints == [1]  # epoch 2's checkpoint was never written
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["epochs_completed"] == 1
    assert all(torch.isfinite(v).all() for v in saved["model"].values())
    # Steps 14–16 went to no weight: the model stayed finite after the bad step.
    assert all(torch.isfinite(p).all() for p in built[0].parameters())


# --- DDP matches one GPU: batch divisibility, SyncBN, per-rank seeds ---------------------------


def test_a_global_batch_that_ranks_cannot_split_evenly_is_refused_at_submit():
    with pytest.raises(ValidationError, match=r"data.batch_size: must be divisible by "
                       r"resources.num_workers \(4\).*got 125; e.g. 124 or 128"):  # fmt: skip
        make_config(data={"batch_size": 125}, resources={"num_workers": 4})
    assert make_config(data={"batch_size": 128}, resources={"num_workers": 4})


@pytest.mark.parametrize("world", [2, 4, 5])
def test_the_ranks_shards_of_a_step_make_up_the_one_gpu_batch(world):
    # docs/training.md: "Not a difference: the batches" — the same samples per step as one GPU.
    n, batch, epoch = 403, 20, 3
    one = epoch_shard(n, epoch, seed=7)
    shards = [epoch_shard(n, epoch, seed=7, rank=r, world_size=world) for r in range(world)]
    per_rank = batch // world
    for i in range(n // batch):
        together = torch.cat([s[i * per_rank : (i + 1) * per_rank] for s in shards])
        assert sorted(together.tolist()) == sorted(one[i * batch : (i + 1) * batch].tolist())


def test_sync_batchnorm_converts_every_batchnorm_and_keeps_the_checkpoint_keys():
    config = make_config(sync_batchnorm=True)
    model = training.build_model(config, input_shape=(1, 40), num_classes=10)
    keys = list(model.state_dict())
    synced = training._sync_batchnorm(model, torch.device("cuda"))  # no CUDA kernel runs here
    norms = [m for m in synced.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    assert list(synced.state_dict()) == keys  # weights files load into the plain model
    with pytest.raises(ConfigurationError, match=r"^sync_batchnorm: needs CUDA"):
        training._sync_batchnorm(model, torch.device("cpu"))


@pytest.mark.slow
def test_compiled_model_trains_and_saves_plain_weights(data_root, tmp_path):
    # ~30 s on one CPU core, almost all of it inductor compiling the probes' and passes' graphs.
    config = make_config(
        model={"name": "mlp", "options": {"hidden": [16]}},
        data={"name": "synthetic", "batch_size": 20, "options": {"shape": [20], "num_train": 100}},
        schedule={"epochs": 1},
        compile_model=True,
    )
    summary = fit(config, data_root=data_root, weights_out=tmp_path / "m.pt")
    assert summary["status"] == "completed" and summary["steps"] == 5
    assert load_trained(tmp_path / "m.pt") is not None  # no "_orig_mod." prefixes


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
        optimizer={"name": "sgd", "lr": 1e9},
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
        optimizer={"name": "sgd", "lr": 1e9},
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


def _ddp_dropout_rank(rank, world, port, out):
    from xsam.distributed import process_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    built, rng_at_dropout = [], []
    real_build = training.build_model

    def build_and_watch(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        for m in built[-1].modules():
            if isinstance(m, torch.nn.Dropout):
                m.register_forward_pre_hook(lambda *_: rng_at_dropout.append(torch.get_rng_state()))
        return built[-1]

    training.build_model = build_and_watch
    config = make_config(
        model={"name": "wrn16_8", "options": {"depth": 10, "widen_factor": 1, "dropout": 0.5}},
        data={
            "name": "synthetic",
            "batch_size": 8,
            "options": {"shape": [3, 8, 8], "num_train": 32},
        },
        optimizer={"name": "sgd"},
        schedule={"epochs": 1},
        resources={"num_workers": world},
    )
    with process_group("gloo", rank=rank, world_size=world, timeout_s=60):
        training.fit(config, data_root=out)
        torch.save(
            {"state": built[0].state_dict(), "rng": rng_at_dropout}, Path(out) / f"rank{rank}.pt"
        )


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ddp_ranks_draw_different_dropout_masks_yet_stay_identical(tmp_path):
    run_ranks(_ddp_dropout_rank, (2, free_port(), str(tmp_path)), nprocs=2, timeout_s=90)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert len(r0["rng"]) == len(r1["rng"]) > 0
    assert not any(torch.equal(a, b) for a, b in zip(r0["rng"], r1["rng"], strict=True))
    params = [k for k in r0["state"] if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in params)


def _ddp_stop_rank(rank, world, port, out, data_root):
    from xsam.distributed import process_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    polls = []

    def should_stop():  # only rank 1 is asked, after its 9th step
        polls.append(1)
        return rank == 1 and len(polls) >= 9

    with process_group("gloo", rank=rank, world_size=world, timeout_s=60):
        summary = training.fit(make_config(), should_stop=should_stop, data_root=data_root)
    torch.save(summary, Path(out) / f"rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ddp_ranks_agree_to_stop_at_the_next_read(data_root, tmp_path):
    # log_every 4: rank 1's request after step 9 is acted on by both ranks at step 12, the
    # documented cancel latency (≤ log_every steps), with no per-step all-reduce.
    run_ranks(
        _ddp_stop_rank, (2, free_port(), str(tmp_path), str(data_root)), nprocs=2, timeout_s=90
    )
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["status"] == r1["status"] == "stopped"
    assert r0["steps"] == r1["steps"] == 12


# --- the CLI ------------------------------------------------------------------------------


def _xsam(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "cli", "train", *args],
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
