"""The job queue, kept in the jobs table.

Every function here runs inside one short transaction that its caller opens (see
`service.db.engine.run_in_transaction`); none holds a transaction for the life of a job. Times
come from the database's clock. A job is owned by an agent through its ``lease_token``: every
heartbeat, ingest, finish and release names it, and an update that matches no row means the lease
is lost.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NoReturn

from sqlalchemy import ColumnElement, CursorResult, case, func, literal, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.contract import TERMINAL, EventType, JobStatus
from service.db.engine import db_now
from service.db.models import Job, JobTag
from service.errors import IdempotencyKeyReused, JobAlreadyFinished, JobNotFound, LeaseLost
from service.events import record_event
from xsam.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeasePolicy:
    """How long a lease lasts and how a job whose lease expired is retried."""

    heartbeat_interval_s: float = 5.0
    lease_timeout_s: float = 15.0
    retry_backoff_s: float = 5.0
    retry_backoff_max_s: float = 300.0

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.lease_timeout_s)

    def backoff(self, attempt: int) -> timedelta:
        """Delay before attempt ``attempt + 1`` may be claimed: exponential, capped."""
        seconds = min(self.retry_backoff_s * 2 ** max(attempt - 1, 0), self.retry_backoff_max_s)
        return timedelta(seconds=seconds)


def enqueue(
    session: Session,
    *,
    owner: str,
    config: TrainConfig,
    owner_key: str | None = None,
    name: str | None = None,
    priority: int = 0,
    max_attempts: int = 3,
    tags: list[str] | None = None,
    idempotency_key: str | None = None,
    idempotency_ttl: timedelta = timedelta(hours=24),
    admit: Callable[[], None] | None = None,
    study_id: int | None = None,
    cell: str | None = None,
) -> tuple[Job, bool]:
    """Add a job owned by `owner_key` (default ``name:<owner>``); returns (job, created).

    The same owner + idempotency key within `idempotency_ttl` of the first submit gives the
    same job if the submission is the same, and raises `IdempotencyKeyReused` if it differs
    (a client reusing a key by mistake must not get someone else's config back). After the
    ttl the key is taken off the old job and names the new one. `admit` is called before a
    new job is created (not for a replay): the quotas raise from it. `study_id` and `cell`
    tie a job to the study that expanded into it (service/studies.py).
    """
    owner_key = owner_key or f"name:{owner}"
    now = db_now(session)
    submission = {
        "name": name,
        "config": config.model_dump(mode="json"),
        "priority": priority,
        "max_attempts": max_attempts,
        "tags": sorted(set(tags or [])),
    }
    if idempotency_key is not None:
        existing = _by_idempotency_key(session, owner_key, idempotency_key)
        if existing is not None and existing.created_at <= now - idempotency_ttl:
            existing.idempotency_key = None  # expired: the key is free again
            session.flush()
        elif existing is not None:
            return _same_submission(existing, submission), False
    if admit is not None:
        admit()
    job = Job(
        name=name,
        owner=owner,
        owner_key=owner_key,
        status=JobStatus.QUEUED.value,
        config=submission["config"],
        priority=priority,
        cpus=config.resources.total_cpus,
        gpus=config.resources.total_gpus,
        attempt=0,
        max_attempts=max_attempts,
        idempotency_key=idempotency_key,
        created_at=now,
        cancel_requested=False,
        study_id=study_id,
        cell=cell,
        tag_rows=[JobTag(tag=t) for t in dict.fromkeys(tags or [])],
    )
    try:
        # A savepoint: on PostgreSQL a concurrent submit with the same key may win the insert.
        with session.begin_nested():
            session.add(job)
            session.flush()
    except IntegrityError:
        existing = _by_idempotency_key(session, owner_key, idempotency_key or "")
        if existing is None:
            raise
        return _same_submission(existing, submission), False
    record_event(session, job.id, EventType.QUEUED, f"submitted by {owner}", now=now)
    return job, True


def _same_submission(job: Job, submission: dict[str, Any]) -> Job:
    """`job` if it was submitted as `submission` (a replay), else `IdempotencyKeyReused`."""
    stored = {
        "name": job.name,
        "config": job.config,
        "priority": job.priority,
        "max_attempts": job.max_attempts,
        "tags": job.tags,
    }
    if stored != submission:
        differs = ", ".join(k for k in submission if stored[k] != submission[k])
        raise IdempotencyKeyReused(
            f"Idempotency-Key {job.idempotency_key!r} was used for job {job.id} with a different"
            f" {differs}; send the same request to get that job, or use a new key"
        )
    return job


def _by_idempotency_key(session: Session, owner_key: str, key: str) -> Job | None:
    stmt = select(Job).where(Job.owner_key == owner_key, Job.idempotency_key == key)
    return session.scalars(stmt).first()


def claim_next(
    session: Session,
    *,
    agent_id: str,
    cpus: float,
    gpus: int,
    policy: LeasePolicy,
    max_running_gpus_per_owner: int = 0,
) -> Job | None:
    """Claim the highest-priority, oldest queued job that fits (`cpus`, `gpus`), or None.

    One statement: the candidate is locked with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL (so
    concurrent claimers pass over each other's rows); SQLite's ``BEGIN IMMEDIATE`` serialises
    writers instead. The attempt counter, a fresh lease token and the lease deadline are
    written into the row in the same statement. With `max_running_gpus_per_owner` > 0, a GPU
    job whose owner already runs that many GPUs is passed over (its owner's other jobs wait;
    everyone else's are claimed). On PostgreSQL two agents claiming at once may each see the
    owner below the limit: the limit can be exceeded by one claim's worth, never more.
    """
    now = db_now(session)
    fits = [Job.cpus <= cpus, Job.gpus <= gpus]
    if max_running_gpus_per_owner > 0:
        running = Job.__table__.alias("running_job")
        owner_gpus = (
            select(func.coalesce(func.sum(running.c.gpus), 0))
            .where(
                running.c.owner_key == Job.owner_key,
                running.c.status == JobStatus.RUNNING.value,
            )
            .scalar_subquery()
        )
        fits.append(or_(Job.gpus == 0, owner_gpus + Job.gpus <= max_running_gpus_per_owner))
    candidate = (
        select(Job.id)
        .where(
            Job.status == JobStatus.QUEUED.value,
            or_(Job.not_before.is_(None), Job.not_before <= now),
            *fits,
        )
        .order_by(Job.priority.desc(), Job.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    lease_token = secrets.token_hex(16)
    claimed = session.execute(
        update(Job)
        .where(Job.id == candidate, Job.status == JobStatus.QUEUED.value)
        .values(
            status=JobStatus.RUNNING.value,
            attempt=Job.attempt + 1,
            lease_token=lease_token,
            lease_expires_at=now + policy.lease,
            agent_id=agent_id,
            started_at=func.coalesce(Job.started_at, now),
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if claimed is None:
        return None
    job = session.get(Job, claimed, populate_existing=True)
    assert job is not None
    record_event(
        session,
        job.id,
        EventType.CLAIMED,
        f"claimed by agent {agent_id} (attempt {job.attempt} of {job.max_attempts})",
        now=now,
        data={"agent_id": agent_id, "attempt": job.attempt},
    )
    return job


def _under_lease(job_id: int, lease_token: str) -> tuple[ColumnElement[bool], ...]:
    """The fence of every agent write: this job, still running, under this lease token.

    An UPDATE with it touches 0 rows exactly when the caller lost the lease.
    """
    return (
        Job.id == job_id,
        Job.lease_token == lease_token,
        Job.status == JobStatus.RUNNING.value,
    )


def hold_lease(
    session: Session,
    job_id: int,
    lease_token: str,
    policy: LeasePolicy,
    *,
    now: datetime | None = None,
    **values: Any,
) -> bool:
    """Renew the lease of a running job and write `values`; returns its cancel_requested flag.

    Raises `LeaseLost` (or `JobNotFound`) when no running row holds `lease_token`: the row is
    locked by this update until commit, so the reaper cannot requeue it under the caller.
    """
    now = now or db_now(session)
    row = session.execute(
        update(Job)
        .where(*_under_lease(job_id, lease_token))
        .values(lease_expires_at=now + policy.lease, **values)
        .returning(Job.cancel_requested)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        refuse_lease(session, job_id)
    return bool(row[0])


def refuse_lease(session: Session, job_id: int) -> NoReturn:
    """Raise why a write under a lease of job `job_id` found no running job holding it."""
    if session.get(Job, job_id) is None:
        raise JobNotFound(f"job {job_id} does not exist")
    raise LeaseLost(f"job {job_id}: lease lost (requeued, reclaimed or finished)")


def heartbeat(
    session: Session,
    job_id: int,
    lease_token: str,
    policy: LeasePolicy,
    *,
    progress: dict[str, Any] | None = None,
) -> bool:
    """Extend the lease (and store progress); returns whether a cancel was requested."""
    now = db_now(session)
    values: dict[str, Any] = {}
    if progress is not None:
        values["progress"] = {**progress, "reported_at": now.isoformat()}
    return hold_lease(session, job_id, lease_token, policy, now=now, **values)


def finish(
    session: Session,
    job_id: int,
    lease_token: str,
    status: JobStatus,
    *,
    error: dict[str, Any] | None = None,
) -> Job:
    """End a running job as `status`; a replay of the same finish is accepted and changes nothing."""
    if status not in TERMINAL:
        raise ValueError(f"finish status must be terminal, got {status!r}")
    now = db_now(session)
    if status is JobStatus.FAILED and error is None:
        error = {
            "type": JobStatus.FAILED.value,
            "message": "the agent reported a failure without a reason",
        }
    result = session.execute(
        update(Job)
        .where(*_under_lease(job_id, lease_token))
        .values(
            status=status.value,
            finished_at=now,
            lease_expires_at=None,
            error=error if status is JobStatus.FAILED else None,
        )
        .execution_options(synchronize_session=False)
    )
    assert isinstance(result, CursorResult)  # (an UPDATE's result: it has a rowcount)
    updated = result.rowcount
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise JobNotFound(f"job {job_id} does not exist")
    if not updated:
        if job.lease_token == lease_token and job.status == status.value:
            return job  # the agent retried a finish whose reply it lost
        raise LeaseLost(f"job {job_id}: lease lost (requeued, reclaimed or finished)")
    if status is JobStatus.FAILED:
        assert error is not None
        message = f"failed: {error.get('type')}: {error.get('message')}"
    else:
        message = f"{status.value} (attempt {job.attempt})"
    record_event(
        session,
        job_id,
        EventType(status),  # a job's finishing event is named by its status
        message,
        now=now,
        data={"attempt": job.attempt, "error": error},
    )
    return job


def release(session: Session, job_id: int, lease_token: str, *, reason: str | None = None) -> Job:
    """Give a running job back to the queue, its attempt not counted (the agent is stopping).

    For an agent that stopped the run with a checkpoint on purpose (shutdown): the job is queued
    again at once (no backoff) and ``attempt`` is decremented, so the next claim hands out the
    same attempt number and ``max_attempts`` counts only attempts that ended in failure (lease
    expiry, infrastructure). A job with a cancel requested is cancelled instead. One statement,
    fenced like `finish`; the lease token is cleared in it, so the released token is refused
    (`LeaseLost`) from then on, a replayed release included, and the next claim writes a new one.
    """
    now = db_now(session)
    cancelling = Job.cancel_requested.is_(True)
    row = session.execute(
        update(Job)
        .where(*_under_lease(job_id, lease_token))
        .values(
            status=case((cancelling, JobStatus.CANCELLED.value), else_=JobStatus.QUEUED.value),
            attempt=case((cancelling, Job.attempt), else_=Job.attempt - 1),
            finished_at=case(
                (cancelling, literal(now, Job.finished_at.type)), else_=Job.finished_at
            ),
            agent_id=case((cancelling, Job.agent_id), else_=None),
            lease_token=None,
            lease_expires_at=None,
            not_before=None,
        )
        .returning(Job.status)
        .execution_options(synchronize_session=False)
    ).first()
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise JobNotFound(f"job {job_id} does not exist")
    if row is None:
        raise LeaseLost(f"job {job_id}: lease lost (requeued, reclaimed, released or finished)")
    why = reason or "no reason given"
    if job.status == JobStatus.CANCELLED.value:
        record_event(
            session,
            job_id,
            EventType.CANCELLED,
            f"cancelled (released by its agent: {why})",
            now=now,
            data={"attempt": job.attempt, "reason": reason},
        )
    else:
        released = job.attempt + 1
        record_event(
            session,
            job_id,
            EventType.RELEASED,
            f"released by its agent: {why}; attempt {released} not counted, queued again",
            now=now,
            data={"attempt": released, "reason": reason},
        )
    log.info("job %d: released -> %s", job_id, job.status)
    return job


def cancel(session: Session, job: Job) -> Job:
    """Cancel `job` (already checked visible to the caller): queued at once, running on request."""
    now = db_now(session)
    # Lock the row: a concurrent claim either happened before (we see running) or skips it.
    locked = session.scalars(
        select(Job)
        .where(Job.id == job.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one()
    status = JobStatus(locked.status)
    if status in TERMINAL:
        raise JobAlreadyFinished(f"job {locked.id} has already finished ({status.value})")
    if status is JobStatus.QUEUED:
        locked.status = JobStatus.CANCELLED.value
        locked.finished_at = now
        record_event(session, locked.id, EventType.CANCELLED, "cancelled while queued", now=now)
    elif not locked.cancel_requested:
        locked.cancel_requested = True
        record_event(
            session,
            locked.id,
            EventType.CANCEL_REQUESTED,
            "cancel requested; the agent will stop the run",
            now=now,
        )
    session.flush()
    return locked


def requeue_expired(session: Session, policy: LeasePolicy, *, limit: int = 100) -> list[Job]:
    """Deal with running jobs whose lease expired (their heartbeats stopped).

    A job with a cancel requested becomes cancelled; one with attempts left is requeued and may be
    claimed again after a backoff; the others fail with ``{type: "lease_expired", ...}``.
    Returns the jobs it changed.
    """
    now = db_now(session)
    expired = list(
        session.scalars(
            select(Job)
            .where(Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < now)
            .order_by(Job.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )
    for job in expired:
        gone = f"no heartbeat from agent {job.agent_id} for attempt {job.attempt}"
        job.lease_token = None
        job.lease_expires_at = None
        if job.cancel_requested:
            job.status = JobStatus.CANCELLED.value
            job.finished_at = now
            record_event(session, job.id, EventType.CANCELLED, f"cancelled ({gone})", now=now)
        elif job.attempt < job.max_attempts:
            job.status = JobStatus.QUEUED.value
            job.agent_id = None
            job.not_before = now + policy.backoff(job.attempt)
            record_event(
                session,
                job.id,
                EventType.REQUEUED,
                f"requeued: {gone}; attempt {job.attempt + 1} of {job.max_attempts} "
                f"not before {job.not_before.isoformat()}",
                now=now,
                data={"attempt": job.attempt, "not_before": job.not_before.isoformat()},
            )
        else:
            job.status = JobStatus.FAILED.value
            job.finished_at = now
            job.error = {
                "type": "lease_expired",
                "message": f"{gone}; all {job.max_attempts} attempts used",
            }
            record_event(
                session,
                job.id,
                EventType.FAILED,
                f"failed: lease_expired: {job.error['message']}",
                now=now,
                data={"attempt": job.attempt, "error": job.error},
            )
        log.info("job %d: lease expired -> %s", job.id, job.status)
    session.flush()
    return expired


def queue_position(session: Session, job: Job) -> int | None:
    """1-based position of a queued job in claim order (priority, then age); None otherwise."""
    if job.status != JobStatus.QUEUED.value:
        return None
    ahead = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(
            Job.status == JobStatus.QUEUED.value,
            or_(
                Job.priority > job.priority,
                (Job.priority == job.priority) & (Job.id < job.id),
            ),
        )
    )
    return int(ahead or 0) + 1


def job_counts(session: Session) -> dict[str, int]:
    """Number of jobs in each status (every status present, zeros included)."""
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
    counts = {s.value: 0 for s in JobStatus}
    counts.update({status: int(n) for status, n in rows})
    return counts
