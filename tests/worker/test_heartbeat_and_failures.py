"""The heartbeat thread (cancel, lease loss, outages) and failure classification."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest

from service.client import LeaseLost, ServiceUnreachable
from service.contract import HeartbeatPublic, IngestPublic, JobPublic, JobStatus, RunOutcome
from worker.failures import classify
from worker.heartbeat import Heartbeats, Lease
from xsam.errors import DataError, DivergedError


class FakeAgentApi:
    def __init__(self, replies, witness_replies=()):
        # A HeartbeatPublic reply, or an exception to raise; the last one repeats. Job 8, the
        # witness, gets its own replies.
        self.replies = {None: list(replies), 8: list(witness_replies)}
        self.beats: list[tuple[int, dict | None]] = []
        self.beaten = threading.Condition()

    def heartbeat(self, job_id, lease_token, progress=None):
        with self.beaten:
            self.beats.append((job_id, progress))
            self.beaten.notify_all()
        replies = self.replies[8 if job_id == 8 else None]
        reply = replies.pop(0) if len(replies) > 1 else replies[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    def beats_of(self, job_id: int) -> int:
        with self.beaten:
            return sum(1 for j, _ in self.beats if j == job_id)

    def wait_for_beats(self, job_id: int, n: int, timeout: float = 5.0) -> bool:
        """Until job_id has been beaten n times (the beat thread is single: every earlier beat's
        reply has been acted on once the next beat starts)."""
        with self.beaten:
            return self.beaten.wait_for(lambda: self.beats_of(job_id) >= n, timeout)


def _wait(event: threading.Event, timeout: float = 5.0) -> bool:
    return event.wait(timeout)


def test_cancel_requested_is_passed_on_once_with_progress_sent():
    api = FakeAgentApi(
        [HeartbeatPublic(cancel_requested=False), HeartbeatPublic(cancel_requested=True)]
    )
    cancelled, lost = threading.Event(), threading.Event()
    calls = []
    beats = Heartbeats(api, max_interval=0.05).start()
    beats.add(Lease(7, "t", 5.0, on_cancel=lambda: (calls.append(1), cancelled.set()),
                    on_lost=lost.set, progress=lambda: {"step": 3}))  # fmt: skip
    assert _wait(cancelled)
    # Two more replies with cancel_requested have been acted on once the fourth beat starts.
    assert api.wait_for_beats(7, 4)  # (the interval is capped at 0.05 s)
    beats.stop()
    assert calls == [1] and not lost.is_set()
    assert api.beats[0] == (7, {"step": 3})


def test_a_lost_lease_stops_its_heartbeats():
    api = FakeAgentApi(
        [LeaseLost(409, "lease_lost", "gone")], [HeartbeatPublic(cancel_requested=False)]
    )
    lost = threading.Event()
    beats = Heartbeats(api, max_interval=0.05).start()
    beats.add(Lease(7, "t", 1.0, on_cancel=lambda: None, on_lost=lost.set))
    assert _wait(lost)
    # A witness lease with the same interval: by its third beat after the loss, job 7 would
    # have been due again twice had it still been held.
    beats.add(Lease(8, "w", 1.0, on_cancel=lambda: None, on_lost=lambda: None))
    assert api.wait_for_beats(8, 3)
    beats.stop()
    assert api.beats_of(7) == 1 and beats.held() == [8]


def test_an_unreachable_service_is_retried():
    api = FakeAgentApi(
        [ServiceUnreachable(0, "unreachable", "down")] * 2
        + [HeartbeatPublic(cancel_requested=True)]
    )
    cancelled = threading.Event()
    beats = Heartbeats(api, max_interval=0.01).start()
    beats.add(Lease(1, "t", 0.01, on_cancel=cancelled.set, on_lost=lambda: None))
    assert _wait(cancelled, 10)
    beats.stop()


class WorkerGroupErrorLike(Exception):
    """Shaped like ray.train.WorkerGroupError: per-rank exceptions in worker_failures."""

    def __init__(self, failures):
        super().__init__("Training failed due to worker errors")
        self.worker_failures = failures


@pytest.mark.parametrize(
    ("exc", "retryable", "code"),
    [
        # a rank raised an XsamError, wrapped by Ray Train
        (WorkerGroupErrorLike({0: DivergedError("loss became nan at step 5")}), False, "diverged"),
        # an unexpected exception of ours or Ray's: an infrastructure failure
        (RuntimeError("object store full"), True, "infrastructure_error"),
        # a rank's process died: nothing of ours inside
        (WorkerGroupErrorLike({1: RuntimeError("worker died")}), True, "infrastructure_error"),
        # rank 1 lost, rank 0 raised a data error: the data error decides
        (WorkerGroupErrorLike({0: DataError("no cifar"), 1: OSError("x")}), False, "data_error"),
    ],
)
def test_classify(exc, retryable, code):
    failure = classify(exc)
    assert (failure.retryable, failure.type) == (retryable, code)


def test_classify_follows_causes():
    try:
        try:
            raise DataError("data set missing at /x")
        except DataError as inner:
            raise RuntimeError("ray task failed") from inner
    except RuntimeError as outer:
        failure = classify(outer)
    assert failure.as_error() == {"type": "data_error", "message": "data set missing at /x"}


class FakeReleaseApi:
    """The agent's client, as far as a shutdown uses it."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.calls: list[tuple] = []

    def release(self, job_id, lease_token, reason=None):
        self.calls.append(("release", job_id, lease_token))
        if self.error is not None:
            raise self.error
        return JobPublic(
            id=job_id, name=None, owner="admin", status=JobStatus.QUEUED, config={}, priority=0,
            attempt=0, max_attempts=1, tags=[], created_at=datetime.now(UTC), started_at=None,
            finished_at=None, progress=None, latest_metrics={}, error=None, queue_position=1,
            cancel_requested=False,
        )  # fmt: skip

    def ingest_events(self, job_id, lease_token, events):
        self.calls.append(("events", job_id, [e["type"] for e in events]))
        return IngestPublic(received=len(events), inserted=len(events))


@pytest.mark.parametrize(
    ("error", "lost"),
    [
        (None, False),  # released: queued again at once, no attempt used
        (ServiceUnreachable(0, "unreachable", "down"), False),  # left to lease expiry
        (LeaseLost(409, "lease_lost", "gone"), True),  # already requeued: nothing more to say
    ],
)
def test_a_job_stopped_for_shutdown_is_released_else_left_to_its_lease(
    monkeypatch, tmp_path, error, lost
):
    pytest.importorskip("ray")
    from types import SimpleNamespace

    import worker.agent
    from worker.agent import Agent, AgentSettings
    from worker.control import SHUTDOWN
    from worker.ray_run import RunResult, RunSettings

    clock = [0.0]  # _retry's backoff against a fake clock: no real waiting for the deadline
    monkeypatch.setattr(
        worker.agent,
        "time",
        SimpleNamespace(
            monotonic=lambda: clock[0], sleep=lambda s: clock.__setitem__(0, clock[0] + s)
        ),
    )
    api = FakeReleaseApi(error)
    settings = AgentSettings(
        server="http://127.0.0.1:9", token="t", run=RunSettings("", "t", tmp_path, tmp_path)
    )
    agent = Agent(settings, client=api)
    agent.heartbeats.add(Lease(7, "tok", 5.0, on_cancel=lambda: None, on_lost=lambda: None))
    run = SimpleNamespace(job_id=7, lease_token="tok", attempt=1, max_attempts=1)
    gone = threading.Event()
    agent._conclude(run, RunResult(RunOutcome.STOPPED, stop_reason=SHUTDOWN), gone)
    releases = [c for c in api.calls if c[0] == "release"]
    assert releases and set(releases) == {("release", 7, "tok")}
    assert ("events", 7, ["attempt_ended"]) not in api.calls
    assert agent.heartbeats.held() == []  # no beat with a released token
    assert gone.is_set() is lost
    if isinstance(error, ServiceUnreachable):
        assert len(releases) > 1 and clock[0] <= 10 + 5  # retried, within its 10 s deadline
