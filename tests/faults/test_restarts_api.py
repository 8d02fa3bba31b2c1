"""The API process SIGKILLed mid-job and restarted on the same port and database while the agent
(a process of its own, as in the compose topology) keeps training: rank 0 buffers its reports
meanwhile and delivers them afterwards; nothing is lost and nothing is stored twice."""

from __future__ import annotations

import time

import pytest
from fault_support import Api, agent_for, assert_every_step_once, epoch_reached, events
from process_support import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(480)]


def test_api_killed_and_restarted_mid_job_nothing_lost_nothing_twice(
    ray_cluster, data_root, tmp_path, tiny_config, wait_for, wait_terminal
):
    epochs = 10
    api_server = Api(tmp_path / "api", free_port()).start()
    agent = None
    try:
        agent = agent_for(
            api_server, ray_cluster.address, data_root, tmp_path / "api" / "checkpoints"
        ).start()
        with api_server.admin() as api:
            job = api.submit(tiny_config(schedule__epochs=epochs), name="api-kill", max_attempts=1)
            wait_for(epoch_reached(api, job.id, 1), 240, 0.2, "the first epoch")
            api_server.kill()
            time.sleep(3)  # rank 0 trains on and buffers; heartbeats fail
            api_server.start()
            assert api.get_job(job.id).status == "running"  # killed mid-run
            done = wait_terminal(api, job.id)
            assert done.status == "succeeded", done
            # The downtime did not cost the lease: the same attempt ran to the end.
            assert done.attempt == 1, done
            all_events = events(api, job.id)
            assert "requeued" not in [e.type for e in all_events]
            # No event stored twice (a resent batch is recognised by its keys).
            keyed = [(e.type, e.message, str(e.data)) for e in all_events]
            assert len(keyed) == len(set(keyed)), keyed
            assert [e.type for e in all_events].count("started") == 1
            assert_every_step_once(api, job.id, epochs)
    finally:
        if agent is not None:
            agent.stop()
        api_server.stop()
