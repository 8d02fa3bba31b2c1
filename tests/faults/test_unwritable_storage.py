"""Checkpoint storage that stops being writable mid-run, with real processes: a separate
`xsam agent` on the session's Ray cluster whose job's checkpoint directory is replaced by a
file after the first epoch. The job ends `failed` with the cause named (not a hang, not
`succeeded` without its checkpoints), what it reported before stays, and the same agent goes
on to run the next job once the storage is back."""

from __future__ import annotations

import shutil

import pytest
from fault_support import Api, agent_for, events
from private_postgres import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]


# 256 s at load 17-19 on the 2-core machine, the session's Ray start included.
@pytest.mark.timeout(600)
def test_a_checkpoint_that_cannot_be_written_fails_the_job_naming_it_and_the_agent_goes_on(
    ray_cluster, data_root, tmp_path, tiny_config, wait_for, wait_terminal
):
    storage = tmp_path / "checkpoints"
    api = Api(tmp_path / "serve", free_port()).start()
    agent = agent_for(api, ray_cluster.address, data_root, storage).start()
    try:
        with api.admin() as admin:
            epochs = 20
            job = admin.submit(tiny_config(schedule__epochs=epochs), name="doomed", max_attempts=1)
            job_id = job["id"]
            run_dir = storage / f"job-{job_id}"

            def first_epoch_done() -> bool:
                return any(e["type"] == "epoch_done" for e in events(admin, job_id))

            wait_for(first_epoch_done, 240, 0.2, "the first epoch")
            shutil.rmtree(run_dir)
            run_dir.write_text("not a directory: the checkpoint storage is gone\n")

            done = wait_terminal(admin, job_id)
            assert done["status"] == "failed", done
            assert done["error"]["type"] == "infrastructure_error", done["error"]
            assert str(run_dir) in done["error"]["message"], done["error"]
            assert done["config"] == job["config"]  # what the user submitted is intact
            series = admin.metrics(job_id, names=["test/acc"])["series"]["test/acc"]
            assert series and series[0]["epoch"] == 1
            assert agent.alive(), agent.tail()

            # The storage is back: the same agent runs the next job to the end.
            run_dir.unlink()
            after = admin.submit(tiny_config(schedule__epochs=2), name="after", max_attempts=1)
            done = wait_terminal(admin, after["id"])
            assert done["status"] == "succeeded", (done, agent.tail())
    finally:
        agent.stop()
        api.stop()
