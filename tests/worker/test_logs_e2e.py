"""End to end on Ray: what a job's ranks write reaches `GET /v1/jobs/{id}/logs`, and a failed
job's error carries the failing rank's traceback."""

from __future__ import annotations

import pytest

from service.contract import LogLinePublic

# Starts the session's Ray cluster and server when run alone (~70 s on a loaded 2-core machine).
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]


def _logs(api, job_id: int, **params) -> tuple[list[LogLinePublic], int]:
    items: list[LogLinePublic] = []
    after, dropped = 0, 0
    while True:
        page = api.logs(job_id, after=after, **params)
        items += page.items
        dropped = page.dropped
        if not page.items:
            return items, dropped
        after = page.next_after


def test_ranks_log_and_raise_lines_arrive_in_order_and_the_error_has_the_traceback(
    api, tiny_config, wait_terminal
):
    # bf16 on CPU makes fit log a warning; lr=1e6 makes it diverge and raise (no retry).
    config = tiny_config(
        resources={"num_workers": 2}, optimizer={"name": "xsam", "lr": 1e6}, precision="bf16"
    )
    job = api.submit(config, name="logs-and-raises")
    done = wait_terminal(api, job.id)
    assert done.status == "failed" and done.error.type == "diverged", done
    traceback = done.error.traceback
    assert "Traceback (most recent call last)" in traceback and "Diverged" in traceback

    lines, dropped = _logs(api, job.id)
    assert dropped == 0
    tracebacks = {}
    for rank in (0, 1):
        mine = [line for line in lines if line.rank == rank]
        texts = [line.text for line in mine]
        assert {line.attempt for line in mine} == {1}
        warning = next((i for i, t in enumerate(texts) if "bf16" in t), None)
        assert warning is not None, lines
        assert mine[warning].level == "WARNING" and mine[warning].stream == "log"
        # No feedback loop: the requests that ship reports and logs are not logged as lines.
        assert not [t for t in texts if "HTTP Request" in t], texts
        if "Traceback (most recent call last):" in texts:
            # The traceback follows the warning, on stderr, line by line in the order written.
            start = texts.index("Traceback (most recent call last):")
            assert start > warning and mine[start].stream == "stderr"
            tracebacks[rank] = "\n".join(texts[start:])
    # The error's traceback is a failing rank's, as that rank wrote it to its log (the other
    # rank may be torn down by Ray before it writes its own).
    assert traceback.rstrip("\n") in tracebacks.values(), (traceback, tracebacks)
    # Each rank recorded its run environment for the attempt.
    envs = api.events(job.id, type="environment").items
    assert sorted((e.data["attempt"], e.data["rank"]) for e in envs) == [(1, 0), (1, 1)]
    assert all(e.data["torch"] and e.data["host"] for e in envs)
    only_1, _ = _logs(api, job.id, rank=1)
    assert only_1 == [line for line in lines if line.rank == 1]
