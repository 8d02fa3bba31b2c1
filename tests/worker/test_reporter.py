"""The rank-0 reporter: batching, retry while the service is unreachable, replay, lease loss."""

from __future__ import annotations

import threading
import time

from service.client import ApiError, LeaseLost, ServiceUnreachable
from service.contract import IngestPublic
from worker.reporter import Reporter


class FakeService:
    """Records what arrives; fails the first ``down`` calls as unreachable (an outage). Answers
    with the contract's models, as `XsamClient` does."""

    def __init__(self, down: int = 0, lost_after: int | None = None) -> None:
        self.down = down
        self.lost_after = lost_after
        self.calls = 0
        self.points: dict[tuple[str, int], float] = {}
        self.events: dict[str, dict] = {}
        self.unkeyed: list[dict] = []
        self.lock = threading.Lock()

    def _call(self) -> None:
        with self.lock:
            self.calls += 1
            if self.lost_after is not None and self.calls > self.lost_after:
                raise LeaseLost(409, "lease_lost", "stale lease")
            if self.down > 0:
                self.down -= 1
                raise ServiceUnreachable(0, "unreachable", "connection refused")

    def ingest_metrics(self, job_id, lease_token, points) -> IngestPublic:
        self._call()
        before = len(self.points)
        for p in points:  # idempotent on (name, step), like the service
            self.points.setdefault((p["name"], p["step"]), p["value"])
        return IngestPublic(received=len(points), inserted=len(self.points) - before)

    def ingest_events(self, job_id, lease_token, events) -> IngestPublic:
        self._call()
        before = len(self.events) + len(self.unkeyed)
        for e in events:
            if e.get("key"):
                self.events.setdefault(e["key"], e)
            else:
                self.unkeyed.append(e)
        return IngestPublic(
            received=len(events), inserted=len(self.events) + len(self.unkeyed) - before
        )


def metrics(step, epoch=1, **values):
    return {"kind": "metrics", "step": step, "epoch": epoch, "values": values}


def event(type_, key=None, **data):
    return {"kind": "event", "type": type_, "message": type_, "data": data, "key": key}


def _until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_records_arrive_in_batches_and_nothing_is_lost():
    service = FakeService()
    reporter = Reporter(service, 1, "lease", interval=0.05).start()
    reporter(event("started", epochs=2, total_steps=4, start_step=0))
    for step in range(1, 5):
        reporter(metrics(step, loss=1.0 / step, acc=0.5))
    reporter(event("epoch_done", key="epoch_done:1", epoch=1, step=4))
    left = reporter.close(5)
    assert left == {"points": [], "events": []}
    assert len(service.points) == 8 and service.points[("loss", 4)] == 0.25
    assert set(service.events) == {"epoch_done:1"} and service.unkeyed[0]["type"] == "started"
    assert service.calls <= 4  # batched, not one request per record


def test_an_outage_is_ridden_out_and_replays_change_nothing():
    service = FakeService(down=3)
    reporter = Reporter(service, 1, "lease", interval=0.05).start()
    for step in range(1, 11):
        reporter(metrics(step, loss=float(step)))
    reporter(event("epoch_done", key="epoch_done:1", epoch=1, step=10))
    left = reporter.close(15)
    assert left == {"points": [], "events": []}
    assert sorted(s for _, s in service.points) == list(range(1, 11))
    # A resumed run replays the epoch: the service keeps one copy.
    replay = Reporter(service, 1, "lease", interval=0.05).start()
    replay(event("epoch_done", key="epoch_done:1", epoch=1, step=10))
    replay(metrics(10, loss=99.0))
    replay.close(5)
    assert len(service.events) == 1 and service.points[("loss", 10)] == 10.0


def test_what_cannot_be_delivered_is_handed_back():
    service = FakeService(down=10_000)
    reporter = Reporter(service, 1, "lease", interval=0.05).start()
    reporter(metrics(1, loss=1.0))
    reporter(event("finished", key="finished"))
    left = reporter.close(0.5)
    assert len(left["points"]) == 1 and len(left["events"]) == 1


def test_a_lost_lease_stops_all_reporting():
    service = FakeService(lost_after=1)
    reporter = Reporter(service, 1, "lease", interval=0.05).start()
    reporter(metrics(1, loss=1.0))
    reporter.flush()
    assert _until(lambda: reporter.pending() == 0)  # the first batch is delivered
    reporter(metrics(2, loss=1.0))
    reporter(event("epoch_done", key="epoch_done:1"))
    assert _until(lambda: reporter.lease_lost)  # the second is refused: the lease is lost
    assert service.points == {("loss", 1): 1.0}
    calls = service.calls
    reporter(metrics(3, loss=1.0))
    assert reporter.close(1) == {"points": [], "events": []}
    assert service.calls == calls  # nothing more was sent


def test_non_finite_values_are_not_sent_and_progress_is_published():
    service = FakeService()
    seen = []
    reporter = Reporter(service, 1, "lease", interval=0.05, on_progress=seen.append).start()
    reporter(event("started", epochs=3, total_steps=30, start_step=10))
    reporter(metrics(12, epoch=2, loss=float("nan"), acc=0.5))
    reporter.close(5)
    assert set(service.points) == {("acc", 12)}
    assert seen[-1] == {"epochs": 3, "steps": 30, "step": 12, "epoch": 2}


def test_non_finite_numbers_in_event_data_are_sent_as_null():
    # The service refuses NaN/Infinity anywhere in a body (422): an α search whose probe loss
    # overflowed must still be reported, with null where JSON has no number.
    service = FakeService()
    reporter = Reporter(service, 1, "lease", interval=0.05).start()
    nan, inf = float("nan"), float("inf")
    reporter(event("alpha_searched", key="a1", alpha=0.5, losses=[1.0, inf, nan], m={"x": -inf}))
    reporter.close(5)
    assert service.events["a1"]["data"] == {
        "alpha": 0.5,
        "losses": [1.0, None, None],
        "m": {"x": None},
    }


def test_a_refused_batch_is_dropped_not_retried_forever():
    class Refusing(FakeService):
        def ingest_metrics(self, job_id, lease_token, points):
            self.calls += 1
            raise ApiError(422, "validation_error", "bad point")

    service = Refusing()
    reporter = Reporter(service, 1, "lease", interval=0.05).start()
    reporter(metrics(1, loss=1.0))
    assert reporter.close(5) == {"points": [], "events": []}
    assert service.calls == 1


def test_a_snapshot_replayed_by_the_next_run_fills_the_gap_without_duplicates():
    # The run is killed after its checkpoint but before its last batch went out: the batch
    # persisted beside the checkpoint is replayed by the run that resumes from it.
    down = FakeService(down=10_000)
    first = Reporter(down, 1, "lease-1", interval=0.05, key_prefix="attempt-1").start()
    first(event("started", epochs=2, total_steps=4, start_step=0))
    first(metrics(2, loss=0.5))
    first(event("epoch_done", key="epoch_done:1", epoch=1, step=2))
    persisted = first.snapshot()
    first.close(0.1)

    service = FakeService()
    service.events["started:attempt-1:1"] = {"type": "started"}  # it did arrive after all
    second = Reporter(service, 1, "lease-2", interval=0.05, key_prefix="attempt-2").start()
    second.replay(persisted)
    second(event("started", epochs=2, total_steps=4, start_step=2))
    assert second.close(5) == {"points": [], "events": []}
    assert service.points == {("loss", 2): 0.5}
    assert sorted(service.events) == ["epoch_done:1", "started:attempt-1:1", "started:attempt-2:1"]
