"""The agent's heartbeat thread: keeps every lease it holds alive, whatever training does.

One daemon thread, its own HTTP client, no Ray calls: a busy trainer, a slow ``ray.get`` or a
blocked job thread cannot delay a heartbeat. Each lease is beaten at the service's
``heartbeat_interval_s`` (at most every ``max_interval`` s, so that a cancel is seen quickly).
A reply with ``cancel_requested`` calls the lease's ``on_cancel`` (once); a 409 calls
``on_lost`` and forgets the lease. While the service is unreachable the thread keeps trying:
the lease outlives a few missed beats (the service's lease timeout is several intervals).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from service.client import ApiError, LeaseLost, ServiceUnreachable, XsamClient

log = logging.getLogger(__name__)


@dataclass
class Lease:
    job_id: int
    lease_token: str
    interval: float
    on_cancel: Callable[[], None]
    on_lost: Callable[[], None]
    progress: Callable[[], dict[str, Any] | None] = lambda: None
    due: float = field(default_factory=time.monotonic)
    cancel_seen: bool = False


class Heartbeats:
    """Heartbeat every registered lease from one background thread."""

    def __init__(self, client: XsamClient, *, max_interval: float = 2.0) -> None:
        self.client = client
        self.max_interval = max_interval
        self._leases: dict[int, Lease] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xsam-heartbeats", daemon=True)

    def start(self) -> Heartbeats:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def add(self, lease: Lease) -> None:
        lease.interval = min(lease.interval, self.max_interval)
        with self._lock:
            self._leases[lease.job_id] = lease

    def remove(self, job_id: int) -> None:
        """Stop beating this lease (the job finished, or is abandoned to the reaper)."""
        with self._lock:
            self._leases.pop(job_id, None)

    def held(self) -> list[int]:
        with self._lock:
            return sorted(self._leases)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                due = [lease for lease in self._leases.values() if lease.due <= now]
            for lease in due:
                self._beat(lease)
            self._stop.wait(0.1)

    def _beat(self, lease: Lease) -> None:
        try:
            progress = lease.progress()
        except Exception:
            progress = None
        try:
            reply = self.client.heartbeat(lease.job_id, lease.lease_token, progress=progress)
        except LeaseLost:
            log.warning("job %d: lease lost (409 on heartbeat); stopping the run", lease.job_id)
            self.remove(lease.job_id)
            lease.on_lost()
            return
        except (ServiceUnreachable, ApiError) as exc:
            # Retry sooner than the interval: the lease survives only a few missed beats.
            log.warning("job %d: heartbeat failed (%s); retrying", lease.job_id, exc)
            lease.due = time.monotonic() + min(1.0, lease.interval)
            return
        lease.due = time.monotonic() + lease.interval
        if reply.cancel_requested and not lease.cancel_seen:
            lease.cancel_seen = True
            log.info("job %d: cancel requested", lease.job_id)
            lease.on_cancel()
