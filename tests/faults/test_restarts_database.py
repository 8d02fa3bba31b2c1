"""PostgreSQL restarted while a job runs: `xsam serve` (API + agent) on a PostgreSQL cluster of
the test's own (the `postgres` fixture: throwaway_postgres.py); the API and the agent reconnect,
the job succeeds on its first attempt, and every step's metrics are stored exactly once."""

from __future__ import annotations

import pytest
from fault_support import assert_every_step_once, epoch_reached, events

# initdb (~10 s on a loaded 2-core machine), the server's start, a 10-epoch job and a restart.
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(480)]


def test_postgres_restarted_mid_job_the_job_succeeds_with_every_step_once(
    postgres, serve_factory, tiny_config, wait_for, wait_terminal
):
    epochs = 10
    server = serve_factory("pg-restart", args=("--database-url", postgres.url)).start()
    try:
        with server.client() as api:
            # One attempt only: a restart that cost the lease would end it failed.
            job = api.submit(tiny_config(schedule__epochs=epochs), name="pg", max_attempts=1)
            wait_for(epoch_reached(api, job.id, 1), 240, 0.2, "the first epoch")
            postgres.restart()  # every connection of the API is closed under it
            assert api.get_job(job.id).status == "running"  # the restart was mid-run
            done = wait_terminal(api, job.id)
            assert done.status == "succeeded", done
            assert done.attempt == 1, done
            assert "requeued" not in [e.type for e in events(api, job.id)]
            assert_every_step_once(api, job.id, epochs)
    finally:
        server.stop()
