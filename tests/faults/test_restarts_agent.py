"""The agent SIGKILLed with two running jobs: `xsam serve` (API + agent) killed after both jobs
wrote a checkpoint, then started again; both jobs resume from their checkpoints as attempt 2,
succeed, and every step is stored exactly once."""

from __future__ import annotations

import subprocess

import pytest
from fault_support import (
    assert_every_step_once,
    epoch_reached,
    events,
    train_processes,
)

# Two jobs at once: 351 s for the call at load 18-27 on 2 cores.
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


def test_agent_sigkilled_with_two_running_jobs_both_resume_as_attempt_2(
    serve_factory, tiny_config, wait_for, wait_terminal
):
    # A server of its own to kill (the shared one, if started, keeps its idle warm actors: only
    # the victim's processes must go).
    others = {pid for pid, _ in train_processes()}
    victim = serve_factory("killed").start()
    # Long enough that the kill lands mid-run for both: the first job may start on a warm actor
    # and run ~1 s epochs while the second still waits for a cold worker group (~20-30 s on an
    # idle machine; with 15 epochs the first had finished before the second's epoch 1).
    epochs = 40
    with victim.client() as api:
        jobs = [
            api.submit(
                tiny_config(schedule__epochs=epochs, seed=seed),
                name=f"survivor-{seed}",
                max_attempts=3,
            )
            for seed in (0, 1)
        ]
        for job in jobs:  # both have a checkpoint (fit writes one every epoch)
            wait_for(epoch_reached(api, job.id, 1), 240, 0.2, f"job {job.id}'s epoch 1")
        assert [api.get_job(j.id).status for j in jobs] == ["running", "running"]
    victim.kill()

    # The dead driver's actors (controller, ranks, control actors) are reaped by Ray; a rank
    # that lived on would be fenced by the service (its lease token is stale after requeue).
    try:
        wait_for(
            lambda: not [p for p, _ in train_processes() if p not in others],
            60, 1, "the killed server's Ray processes",
        )  # fmt: skip
    finally:
        for pid, _ in train_processes():  # clean up, whatever the assertion said
            if pid not in others:
                subprocess.run(["kill", "-9", str(pid)], check=False)

    victim.start()
    try:
        with victim.client() as api:
            for job in jobs:
                done = wait_terminal(api, job.id)
                assert done.status == "succeeded", done
                assert done.attempt == 2, done
                job_events = events(api, job.id)
                assert "requeued" in [e.type for e in job_events]
                starts = [e for e in job_events if e.type == "started"]
                assert len(starts) == 2 and "resumed" in starts[1].message, starts
                # Attempt 2 began where attempt 1's last checkpoint left off, not at step 0.
                assert (starts[1].data or {}).get("start_step", 0) > 0, starts[1]
                assert_every_step_once(api, job.id, epochs)
    finally:
        victim.stop()
