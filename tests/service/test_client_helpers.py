"""The typed client on its own (httpx MockTransport): replies parse into the contract's models,
errors are chosen by the server's code, and the helpers wait, page and follow."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pytest

from service.client import ApiError, Conflict, LeaseLost, NotFound, XsamClient
from service.contract import EventPublic, EventsPublic, JobPublic, JobsPublic, JobStatus

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def job(id: int = 1, status: JobStatus = JobStatus.RUNNING) -> JobPublic:
    return JobPublic(
        id=id, name=None, owner="alice", status=status, config={}, priority=0, attempt=1,
        max_attempts=3, tags=[], created_at=T0, started_at=None, finished_at=None,
        progress=None, latest_metrics={}, error=None, queue_position=None,
        cancel_requested=False,
    )  # fmt: skip


def client(handler) -> XsamClient:
    return XsamClient("http://x", "t", transport=httpx.MockTransport(handler))


def reply(model) -> httpx.Response:
    return httpx.Response(200, json=model.model_dump(mode="json"))


def test_a_reply_is_the_contracts_model():
    api = client(lambda request: reply(job(7, JobStatus.QUEUED)))
    got = api.get_job(7)
    assert isinstance(got, JobPublic) and got.status is JobStatus.QUEUED and got.created_at == T0


@pytest.mark.parametrize(
    ("status", "code", "raised"),
    [
        # the code decides, whatever the route: a lost lease is LeaseLost, not a mere Conflict
        (409, "lease_lost", LeaseLost),
        (409, "job_finished", Conflict),
        (404, "study_not_found", NotFound),
        # a code this client does not know yet falls back to its status's class
        (409, "some_new_conflict", Conflict),
        (418, "teapot", ApiError),
    ],
)
def test_errors_are_chosen_by_code(status, code, raised):
    api = client(lambda request: httpx.Response(status, json={"detail": "d", "code": code}))
    with pytest.raises(raised) as exc:
        api.get_job(1)
    assert type(exc.value) is raised and exc.value.code == code and exc.value.status == status


def test_wait_for_job_polls_until_terminal_and_shows_every_state():
    statuses = iter([JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED])
    api = client(lambda request: reply(job(1, next(statuses))))
    seen: list[JobStatus] = []
    done = api.wait_for_job(1, poll_s=0, on_poll=lambda j: seen.append(j.status))
    assert done.status is JobStatus.SUCCEEDED
    assert seen == [JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED]


def test_wait_for_job_gives_up_after_its_timeout():
    api = client(lambda request: reply(job(1, JobStatus.RUNNING)))
    with pytest.raises(TimeoutError, match="still running"):
        api.wait_for_job(1, timeout=0, poll_s=0)


def test_iter_jobs_reads_every_page():
    pages = {
        None: JobsPublic(items=[job(3), job(2)], next_cursor="c2"),
        "c2": JobsPublic(items=[job(1)], next_cursor=None),
    }
    cursors: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        cursor = request.url.params.get("cursor")
        cursors.append(cursor)
        assert request.url.params["limit"] == "2"
        return reply(pages[cursor])

    assert [j.id for j in client(handler).iter_jobs(page_size=2)] == [3, 2, 1]
    assert cursors == [None, "c2"]


def test_follow_events_reads_to_the_jobs_end():
    events = [
        EventPublic(id=i, time=T0, type=t, message="", data=None)
        for i, t in enumerate(["queued", "claimed", "started", "succeeded"], start=1)
    ]
    # The job ends after the second page: what was recorded with the end is read too.
    visible = {"n": 2}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            after = int(request.url.params["after"])
            items = [e for e in events[: visible["n"]] if e.id > after]
            return reply(EventsPublic(items=items, next_after=items[-1].id if items else after))
        visible["n"] = len(events)
        return reply(job(1, JobStatus.SUCCEEDED))

    got = [e.type for e in client(handler).follow_events(1, poll_s=0)]
    assert got == ["queued", "claimed", "started", "succeeded"]
