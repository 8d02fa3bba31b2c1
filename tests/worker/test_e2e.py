"""End to end: `xsam serve` (API + agent) on the session's local Ray cluster, over real HTTP.

Each test submits tiny MNIST-1D jobs and checks what a user sees through the API: statuses,
metrics, events, the downloaded model; cancel within 10 s; a Ctrl-C'd server whose job is
released and resumes on the next start with no attempt used; failures that no retry can fix.
Killed ranks, agents, APIs and databases are tests/faults/test_restarts_*.py's.
"""

from __future__ import annotations

import time

import pytest

from service.contract import EventPublic

# The first test also starts the session's Ray cluster and server (~70 s on a loaded 2-core
# machine); no test here needs more than ~60 s on its own.
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]


def _events(api, job_id: int) -> list[EventPublic]:
    items: list[EventPublic] = []
    after = 0
    while True:
        page = api.events(job_id, after=after)
        items += page.items
        if not page.items or page.next_after == after:
            return items
        after = page.next_after


def test_xsam_job_on_two_ranks_succeeds_with_metrics_events_and_model(
    serve, api, tiny_config, wait_terminal, data_root, tmp_path
):
    config = tiny_config(resources={"num_workers": 2}, schedule__epochs=3)
    job = api.submit(config, name="two-ranks", tags=["e2e"])
    statuses: list[str] = []
    done = wait_terminal(api, job.id, statuses=statuses)
    assert done.status == "succeeded", done
    assert "running" in statuses and done.attempt == 1

    # Per-step metrics every log_every steps, per-epoch validation once per epoch.
    series = api.metrics(job.id).series
    steps_per_epoch = 600 // 50
    total = 3 * steps_per_epoch
    assert [p.step for p in series["train/loss"]] == list(range(2, total + 1, 2))
    assert [p.epoch for p in series["test/acc"]] == [1, 2, 3]
    # Both ranks used the same α at every search (fit gathers them under DDP).
    assert series["xsam/alpha_rank_spread"] and all(
        p.value == 0 for p in series["xsam/alpha_rank_spread"]
    )

    events = _events(api, job.id)
    types = [e.type for e in events]
    for expected in ("claimed", "started", "epoch_done", "checkpoint", "finished", "succeeded"):
        assert expected in types, types
    assert types.count("epoch_done") == 3
    searches = [e for e in events if e.type == "alpha_search"]
    assert len(searches) == 3  # the first minibatch of every epoch
    curve = searches[0].data
    assert len(curve["alphas"]) == len(curve["losses"]) == 21  # the α grid 0:0.1:2
    checks = [e.data for e in events if e.type == "alpha_check"]
    assert checks and all(c["consistent"] and len(c["alphas"]) == 2 for c in checks)

    # The artifact downloads, loads, and reproduces the reported validation accuracy.
    import torch  # noqa: F401  (the model file is a torch state dict)

    from xsam.config import TrainConfig
    from xsam.data import load_dataset
    from xsam.training import evaluate, load_trained

    path = api.download_model(job.id, tmp_path)
    model = load_trained(path)
    data = load_dataset(TrainConfig.model_validate(config), data_root=data_root)
    measured = evaluate(model, data)
    assert measured["test/acc"] == pytest.approx(series["test/acc"][-1].value, abs=1e-6)
    assert measured["test/loss"] == pytest.approx(series["test/loss"][-1].value, rel=1e-4)
    assert (serve.data_dir / "artifacts" / f"job-{job.id}" / "config.json").exists()


def test_cancel_stops_a_running_job_within_10_s_with_a_checkpoint(
    serve, api, tiny_config, wait_terminal, wait_for
):
    job = api.submit(tiny_config(schedule__epochs=200), name="to-cancel")

    def training():
        progress = api.get_job(job.id).progress
        return progress is not None and (progress.step or 0) > 0

    wait_for(training, 240, 0.5, "the job to train")
    asked = time.monotonic()
    api.cancel(job.id)
    done = wait_terminal(api, job.id, timeout=30)
    took = time.monotonic() - asked
    assert done.status == "cancelled"
    assert took < 10, f"cancel took {took:.1f} s"
    assert (serve.data_dir / "checkpoints" / f"job-{job.id}" / "checkpoint.pt").exists()
    assert "stopped" in [e.type for e in _events(api, job.id)]


def test_failures_a_retry_cannot_fix_end_failed_on_the_first_attempt(
    api, tiny_config, wait_terminal
):
    missing = api.submit(
        tiny_config(data={"name": "cifar10", "root": "no/such/cifar", "batch_size": 50}),
        name="missing-data",
    )
    diverging = api.submit(tiny_config(optimizer={"name": "xsam", "lr": 1e6}), name="diverges")
    for job, code, words in ((missing, "data_error", "cifar"), (diverging, "diverged", "nan")):
        done = wait_terminal(api, job.id)
        assert done.status == "failed", done
        assert done.error.type == code
        assert words in done.error.message.lower(), done.error
        assert done.attempt == 1  # not retried
    time.sleep(2)  # nothing requeues it later either
    assert api.get_job(diverging.id).attempt == 1


def test_ctrl_c_releases_the_running_job_and_the_next_start_resumes_it(
    serve_factory, tiny_config, wait_for, wait_terminal
):
    # A server of its own to interrupt. max_attempts=1: had the shutdown cost an attempt (the
    # old lease-expiry path), the job could not run again and would end failed.
    server = serve_factory("interrupted").start()
    epochs = 15  # long enough that the SIGINT lands mid-run
    with server.client() as api:
        job = api.submit(tiny_config(schedule__epochs=epochs), name="ctrl-c", max_attempts=1)
        wait_for(
            lambda: any(e.type == "epoch_done" for e in _events(api, job.id)),
            240, 0.2, "the first epoch",
        )  # fmt: skip
    assert server.interrupt(timeout=60) == 0
    assert (server.data_dir / "checkpoints" / f"job-{job.id}" / "checkpoint.pt").exists()

    # Between the two starts: queued again at once (not left running for the reaper), released.
    with server.api_only() as api:
        between = api.get_job(job.id)
        events = _events(api, job.id)
    assert between.status == "queued" and between.attempt == 0, between
    types = [e.type for e in events]
    assert types[-2:] == ["stopped", "released"], types
    assert events[-1].data["attempt"] == 1
    stopped_at = events[-2].data["step"]

    server.start()
    with server.client() as api:
        done = wait_terminal(api, job.id)
        events = _events(api, job.id)
        series = api.metrics(job.id).series
    server.stop()
    assert done.status == "succeeded", done
    # No failure counted: both claims were attempt 1 (of 1), and nothing was requeued.
    assert done.attempt == 1
    assert [e.data["attempt"] for e in events if e.type == "claimed"] == [1, 1]
    types = [e.type for e in events]
    assert "requeued" not in types and "attempt_ended" not in types, types
    # The second run continued from the stop's checkpoint, not from epoch 1.
    starts = [e for e in events if e.type == "started"]
    assert len(starts) == 2 and "resumed" in starts[1].message, starts
    assert starts[1].data["start_step"] == stopped_at > 0
    # Every epoch and every logged step exactly once across the two runs.
    assert [e.data["epoch"] for e in events if e.type == "epoch_done"] == list(range(1, epochs + 1))
    assert [p.epoch for p in series["test/acc"]] == list(range(1, epochs + 1))
    assert [p.step for p in series["train/loss"]] == list(range(2, epochs * 12 + 1, 2))


def test_a_terminal_ctrl_c_reaches_serve_but_not_its_local_ray_head(ray_cluster):
    # A terminal sends Ctrl-C's SIGINT to its whole foreground process group. Were the local
    # head (and so its raylet and the jobs' ranks) in `xsam serve`'s group, the ranks would die
    # mid-step, before the agent could stop them with a checkpoint and release their jobs.
    import os

    head = ray_cluster.process.pid
    assert os.getsid(head) == head != os.getsid(0)
    assert os.getpgid(head) != os.getpgrp()
