"""What one user may ask of the queue: queued jobs, priority, submit rate, option sizes.

A small lab shares one queue; these limits keep one script (or one careless loop) from
crowding everyone else out. Each is a setting (service.settings) with a default such a lab
would pick; admins are exempt. Refusals are domain errors with a stable code: 429 for the
queue and the rate (the rate with ``Retry-After``), 403 for the priority, 422 naming the field
for an oversized option object.
"""

from __future__ import annotations

import json
import math
import threading
import time
from typing import Any

from fastapi.exceptions import RequestValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.auth import Principal
from service.contract import JobStatus
from service.db.models import Job
from service.errors import PriorityNotAllowed, QuotaExceeded, RateLimited
from service.settings import Settings


class SubmitRateLimiter:
    """A token bucket per owner: `per_minute` submits a minute, in bursts of up to as many.

    Kept in the API process (one bucket per token); with several API processes each allows
    the rate, which bounds the total all the same.
    """

    def __init__(self, per_minute: float) -> None:
        self.per_minute = per_minute
        self._buckets: dict[str, tuple[float, float]] = {}  # owner -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, owner_key: str) -> None:
        """Spend one submit of `owner_key`'s, or raise `RateLimited` saying when to retry."""
        if self.per_minute <= 0:
            return
        capacity, per_s = max(self.per_minute, 1.0), self.per_minute / 60
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(owner_key, (capacity, now))
            tokens = min(capacity, tokens + (now - at) * per_s)
            if tokens < 1:
                wait = math.ceil((1 - tokens) / per_s)
                self._buckets[owner_key] = (tokens, now)
                raise RateLimited(
                    f"more than {self.per_minute:g} submits a minute; retry in {wait} s",
                    retry_after=wait,
                )
            self._buckets[owner_key] = (tokens - 1, now)


def check_submit(
    session: Session,
    owner: Principal,
    *,
    priority: int,
    config: dict[str, Any],
    settings: Settings,
    limiter: SubmitRateLimiter,
) -> None:
    """Refuse a submit that breaks a quota (admins are exempt from all but the option size)."""
    _check_option_sizes(config, settings.max_options_bytes)
    if owner.is_admin:
        return
    if priority > settings.max_user_priority:
        raise PriorityNotAllowed(
            f"priority {priority} is above {settings.max_user_priority}, the most a user token "
            "may ask for (admins may go up to 1000)"
        )
    limiter.take(owner.owner_key)
    check_queued(session, owner, settings)


def check_queued(session: Session, owner: Principal, settings: Settings) -> None:
    """Refuse one more queued job of `owner`'s past the queued-jobs quota (admins exempt)."""
    if owner.is_admin:
        return
    queued = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.owner_key == owner.owner_key, Job.status == JobStatus.QUEUED.value)
    )
    if queued is not None and queued >= settings.max_queued_jobs_per_user:
        raise QuotaExceeded(
            f"{queued} of your jobs are queued, the most allowed "
            f"(XSAM_MAX_QUEUED_JOBS_PER_USER={settings.max_queued_jobs_per_user}); wait for "
            "some to start or cancel some"
        )


def _check_option_sizes(config: dict[str, Any], limit: int) -> None:
    for section in ("model", "data"):
        options = (config.get(section) or {}).get("options") or {}
        size = len(json.dumps(options, separators=(",", ":")).encode())
        if size > limit:
            raise RequestValidationError(
                [
                    {
                        "type": "too_large",
                        "loc": ("body", "config", section, "options"),
                        "msg": f"options take {size} bytes as JSON; at most {limit} allowed",
                        "input": None,
                    }
                ]
            )
