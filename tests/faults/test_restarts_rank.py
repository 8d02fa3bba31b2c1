"""One training rank's process SIGKILLed mid-epoch: the attempt restarts its ranks, resumes from
the last checkpoint, succeeds, and every step is stored exactly once."""

from __future__ import annotations

import subprocess

import pytest
from fault_support import assert_every_step_once, events, train_processes

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(480)]


@pytest.mark.parametrize(
    ("workers", "rank_process"),
    [
        # One rank: a warm actor (worker/warm_pool.py); the job runs again in another one.
        (1, "ray::WarmRank.run"),
        # Two ranks: a TorchTrainer; Ray Train restarts the worker group.
        (2, "ray::RayTrainWorker"),
    ],
)
def test_a_killed_rank_is_restarted_and_resumes_within_the_attempt(
    serve, api, tiny_config, wait_for, wait_terminal, workers, rank_process
):
    epochs = 25
    job = api.submit(
        tiny_config(schedule__epochs=epochs, resources={"num_workers": workers}),
        name="rank-killed",
    )

    def past_epoch_2():
        progress = api.get_job(job.id).progress
        return progress is not None and (progress.epoch or 0) >= 2

    wait_for(past_epoch_2, 240, 0.3, "two epochs")
    # This job's last rank, by the pid its run environment reports: the process titles alone
    # cannot tell this job's rank from an earlier run's process Ray is still releasing (or a
    # warm actor whose title still names its last task) — the stress runs killed such ones.
    envs = events(api, job.id, "environment")
    pid = next(e.data["pid"] for e in envs if e.data and e.data["rank"] == workers - 1)
    args = dict(train_processes()).get(pid, "")
    assert args.startswith(rank_process), (pid, args)
    subprocess.run(["kill", "-9", str(pid)], check=True)

    done = wait_terminal(api, job.id)
    assert done.status == "succeeded" and done.attempt == 1, done
    starts = events(api, job.id, "started")
    assert len(starts) == 2 and "resumed" in starts[1].message, starts
    # The rank was killed past epoch 2: the restart resumed from a checkpoint, not step 0.
    assert (starts[1].data or {}).get("start_step", 0) > 0, starts[1]
    assert_every_step_once(api, job.id, epochs)
