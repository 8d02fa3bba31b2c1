"""Checkpoint storage that cannot be written: the job fails on its first attempt with
``storage_error`` (the path and the reason in its ``error`` and its ``failed`` event), instead
of being retried until its attempts run out. A real `xsam serve` on the session's Ray cluster.

The paths are made unwritable in a way that holds for root too (the tests may run as root,
where a chmod stops nothing): a regular file where a directory must be, and a directory where a
file must be.
"""

from __future__ import annotations

import pytest
from fault_support import events

from service.client import XsamClient
from service.contract import JobPublic

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]


def _failed_once_with_storage_error(
    api: XsamClient, job: JobPublic, wait_terminal, path_part: str
) -> None:
    done = wait_terminal(api, job.id)
    assert done.status == "failed", done
    assert done.error is not None and done.error.type == "storage_error", done.error
    message = done.error.message
    assert message.startswith("cannot write ") and path_part in message, message
    assert done.attempt == 1 and done.max_attempts > 1, done  # attempts left, not used
    types = [e.type for e in events(api, job.id)]
    assert "requeued" not in types and "attempt_ended" not in types, types
    failed = events(api, job.id, "failed")
    assert [(e.data or {})["error"]["type"] for e in failed] == ["storage_error"], failed


def test_unwritable_checkpoint_storage_fails_the_job_once_with_storage_error(
    serve_factory, tiny_config, wait_terminal
):
    server = serve_factory("storage-error")
    checkpoints = server.data_dir / "checkpoints"
    # Job 1 (a fresh database): its run directory is a regular file; the agent cannot create it.
    checkpoints.mkdir(parents=True)
    (checkpoints / "job-1").write_text("a file where the run directory must be\n")
    # Job 2: its run directory exists, but the report file rank 0 writes beside the checkpoint
    # at the end of epoch 1 is a directory: the rank's first write fails, mid-run.
    (checkpoints / "job-2" / "undelivered.json").mkdir(parents=True)
    server.start()
    with server.client() as api:
        agent_side = api.submit(tiny_config(), name="run-dir-is-a-file", max_attempts=3)
        rank_side = api.submit(tiny_config(), name="report-file-is-a-dir", max_attempts=3)
        assert (agent_side.id, rank_side.id) == (1, 2)
        _failed_once_with_storage_error(api, agent_side, wait_terminal, "job-1")
        _failed_once_with_storage_error(api, rank_side, wait_terminal, "undelivered.json")
        # The rank's traceback is kept with the error (issue 10: a failed job's error adds it).
        error = api.get_job(rank_side.id).error
        assert error is not None and "StorageError" in (error.traceback or ""), error
    server.stop()
