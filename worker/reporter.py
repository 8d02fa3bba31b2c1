"""Rank 0's reporter: fit()'s ``report`` callback, batched to the service under the job's lease.

fit() calls the reporter for every record; the reporter only appends to a buffer, so training
never waits on the network. A background thread sends the buffer about once a second, and at
once after every ``epoch_done`` event. While the service is unreachable (or answers 5xx) the
buffer is kept and the send retried with backoff; a replay is harmless because the service
ignores a metric point it already has (same name and step) and an event whose ``key`` it
already has. A 409 means the lease is gone: everything pending is dropped, nothing more is
sent, and `lease_lost` becomes true (the run's ``should_stop`` reads it).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from service.client import ApiError, LeaseLost, ServiceUnreachable, XsamClient
from service.contract import EventType

log = logging.getLogger(__name__)

#: Most points / events in one request (the service's defaults allow 5000 / 1000).
MAX_POINTS_PER_BATCH = 2000
MAX_EVENTS_PER_BATCH = 500
#: Past this many undelivered points the oldest are dropped (an outage must not exhaust memory).
MAX_BUFFERED_POINTS = 200_000


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _json_numbers(value: Any) -> Any:
    """`value` with NaN/±inf written as null: JSON has no such numbers, and the service refuses
    a batch holding them (422), so a diverged α probe loss must not cost the whole batch."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_numbers(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_numbers(v) for v in value]
    return value


class Reporter:
    """Batch fit() records to ``POST /v1/agent/jobs/{id}/metrics|events`` with a lease token.

    Args:
        client: an `XsamClient` with an agent (or admin) token.
        job_id, lease_token: the lease this run reports under.
        interval: seconds between sends while records arrive.
        on_progress: called (from the sender thread) with ``{epoch, epochs, step, steps}``
            whenever it changed, after each send, delivered or not; the agent heartbeats it
            and its stall rule watches the step.
    """

    def __init__(
        self,
        client: XsamClient,
        job_id: int,
        lease_token: str,
        *,
        interval: float = 1.0,
        on_progress: Callable[[dict[str, int]], None] | None = None,
        key_prefix: str | None = None,
    ) -> None:
        self.client = client
        self.job_id = job_id
        self.lease_token = lease_token
        self.interval = interval
        self.on_progress = on_progress
        # Events fit sends without a key get one (unique to this attempt), so that a replay
        # of a persisted batch (see `snapshot`) cannot duplicate them.
        self.key_prefix = key_prefix
        self._unkeyed = 0
        self._lock = threading.Lock()
        self._points: list[dict[str, Any]] = []
        self._events: list[dict[str, Any]] = []
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._lost = threading.Event()
        self._abandoned = threading.Event()
        self._thread: threading.Thread | None = None
        self._progress: dict[str, int] = {}
        self._sent_progress: dict[str, int] = {}
        self.dropped_points = 0

    # --- fit()'s side --------------------------------------------------------------------

    def __call__(self, record: dict[str, Any]) -> None:
        """fit()'s ``report`` callback: buffer the record, never block on the network."""
        if self._lost.is_set():
            return
        now = _now()
        with self._lock:
            if record["kind"] == "metrics":
                step, epoch = int(record["step"]), int(record["epoch"])
                for name, value in record["values"].items():
                    # JSON has no NaN/inf; a diverged loss is reported as a failed event instead.
                    if value is None or not math.isfinite(float(value)):
                        continue
                    self._points.append(
                        {
                            "name": name,
                            "step": step,
                            "value": float(value),
                            "epoch": epoch,
                            "time": now,
                        }
                    )
                self._progress.update(step=step, epoch=epoch)
                overflow = len(self._points) - MAX_BUFFERED_POINTS
                if overflow > 0:
                    del self._points[:overflow]
                    self.dropped_points += overflow
            else:
                event = {
                    "type": record["type"],
                    "message": record.get("message", ""),
                    "data": _json_numbers(record.get("data") or {}),
                    "time": now,
                }
                if record.get("key"):
                    event["key"] = record["key"]
                elif self.key_prefix is not None:
                    self._unkeyed += 1
                    event["key"] = f"{record['type']}:{self.key_prefix}:{self._unkeyed}"
                self._events.append(event)
                self._track_progress(record)
        if record.get("type") == EventType.EPOCH_DONE:
            self._wake.set()  # every epoch end is sent at once

    def _track_progress(self, record: dict[str, Any]) -> None:
        data = record.get("data") or {}
        if record["type"] == EventType.STARTED:
            self._progress.update(
                epochs=int(data.get("epochs", 0)),
                steps=int(data.get("total_steps", 0)),
                step=int(data.get("start_step", 0)),
            )
        elif record["type"] == EventType.EPOCH_DONE:
            self._progress.update(epoch=int(data.get("epoch", 0)), step=int(data.get("step", 0)))

    @property
    def lease_lost(self) -> bool:
        return self._lost.is_set()

    def lose_lease(self) -> None:
        """The lease is gone (told by the agent): drop everything, send nothing more."""
        self._lost.set()
        with self._lock:
            self._points.clear()
            self._events.clear()
        self._wake.set()

    # --- the sender ------------------------------------------------------------------------

    def start(self) -> Reporter:
        self._thread = threading.Thread(
            target=self._run, name=f"xsam-reporter-{self.job_id}", daemon=True
        )
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> dict[str, list[dict[str, Any]]]:
        """Send what is buffered (trying for up to ``timeout`` s) and stop the sender thread.

        Returns what could not be delivered, ``{"points": [...], "events": [...]}``, so that the
        agent can deliver it before it finishes the job.
        """
        deadline = time.monotonic() + timeout
        self._closing.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread is None or not self._thread.is_alive():
            # Last chance in this thread (no sender, or it finished before the final records).
            while self.pending() and not self._lost.is_set() and time.monotonic() < deadline:
                # Only this thread sends now (the sender has exited).
                if not self._send_once():
                    time.sleep(0.5)
        self._abandoned.set()  # what is left is the caller's now: the sender must not resend it
        with self._lock:
            left = {"points": list(self._points), "events": list(self._events)}
        return left

    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        """What is not delivered yet (copies). Persisted beside each checkpoint and replayed by
        the run that resumes from it, so that no record older than a checkpoint can be lost."""
        with self._lock:
            return {"points": list(self._points), "events": list(self._events)}

    def replay(self, undelivered: dict[str, list[dict[str, Any]]]) -> None:
        """Queue records a previous run could not deliver (the service drops duplicates)."""
        with self._lock:
            self._events[:0] = list(undelivered.get("events") or [])
            self._points[:0] = list(undelivered.get("points") or [])
        self._wake.set()

    def pending(self) -> int:
        with self._lock:
            return len(self._points) + len(self._events)

    def flush(self) -> None:
        """Ask the sender thread to send now (does not wait)."""
        self._wake.set()

    def _run(self) -> None:
        backoff = self.interval
        while not self._lost.is_set() and not self._abandoned.is_set():
            self._wake.wait(backoff)
            self._wake.clear()
            ok = self._send_all()
            if self._closing.is_set() and (not self.pending() or self._lost.is_set()):
                return
            backoff = self.interval if ok else min(max(backoff * 2, 0.5), 10.0)
            if self._closing.is_set() and not ok:
                time.sleep(min(backoff, 0.5))  # close() bounds the wait

    def _send_all(self) -> bool:
        try:
            while self.pending() and not self._lost.is_set() and not self._abandoned.is_set():
                if not self._send_once():
                    return False
            return True
        finally:
            # Even while the service is unreachable: the agent's stall rule (worker/health.py)
            # watches these steps, and a service outage is not a stalled run.
            self._publish_progress()

    def _send_once(self) -> bool:
        """Send one batch (events first: an epoch's event precedes the next epoch's metrics)."""
        with self._lock:
            events = self._events[:MAX_EVENTS_PER_BATCH]
            points = [] if events else self._points[:MAX_POINTS_PER_BATCH]
        try:
            if events:
                self.client.ingest_events(self.job_id, self.lease_token, events)
            elif points:
                self.client.ingest_metrics(self.job_id, self.lease_token, points)
        except LeaseLost:
            log.warning("job %d: lease lost; dropping reports and stopping", self.job_id)
            self.lose_lease()
            return False
        except ServiceUnreachable as exc:
            log.warning("job %d: service unreachable, will retry: %s", self.job_id, exc.detail)
            return False
        except ApiError as exc:
            if exc.status >= 500 or exc.status == 429:
                log.warning("job %d: service error %s, will retry", self.job_id, exc)
                return False
            # A 4xx other than 409 will not change on retry: log it and drop the batch.
            log.error("job %d: service refused a report batch: %s", self.job_id, exc)
        with self._lock:
            if events:
                del self._events[: len(events)]
            else:
                del self._points[: len(points)]
        return True

    def _publish_progress(self) -> None:
        if self.on_progress is None:
            return
        with self._lock:
            progress = dict(self._progress)
        if progress and progress != self._sent_progress:
            self._sent_progress = progress
            try:
                self.on_progress(progress)
            except Exception:  # progress is advisory; never let it stop reporting
                log.debug("progress callback failed", exc_info=True)
