"""/v1/agent: what an agent calls — claim, heartbeat, ingest, finish, release (agent or admin
tokens).

Everything after the claim is fenced by the job's lease token: a stale token gets 409 and
changes nothing, and the agent must stop that run.
"""

from __future__ import annotations

from collections.abc import Callable, Sized
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from service import events as event_log
from service import job_logs, metric_ingest_pg, metric_series, metrics_body, queue
from service.contract import (
    ClaimPublic,
    HealthRulesPublic,
    HeartbeatPublic,
    IngestPublic,
    JobPublic,
    LeasePublic,
)
from service.db.engine import db_now
from service.db.models import Job
from service.deps import AgentDep, AppState, SessionDep, StateDep
from service.errors import PayloadTooLarge
from service.routes.jobs import JobId, job_public
from service.schemas import (
    ClaimRequest,
    EventsIngest,
    FinishRequest,
    HeartbeatRequest,
    LogsIngest,
    ReleaseRequest,
    error_responses,
)

router = APIRouter(
    prefix="/v1/agent",
    tags=["agent"],
    responses=error_responses(400, 401, 403, 404, 409, 413, 503),
)


@router.post(
    "/claim",
    response_model=ClaimPublic,
    responses={204: {"description": "no queued job fits the capacity"}},
)
def claim(
    body: ClaimRequest, session: SessionDep, agent: AgentDep, state: StateDep
) -> ClaimPublic | Response:
    """Claim the highest-priority, oldest queued job that fits the capacity (204 when none)."""
    with session.begin():
        job = queue.claim_next(
            session,
            agent_id=body.agent_id,
            cpus=body.capacity.cpus,
            gpus=body.capacity.gpus,
            policy=state.policy,
            max_running_gpus_per_owner=state.settings.max_running_gpus_per_user,
        )
        if job is None:
            return Response(status_code=204)
        assert job.lease_token is not None
        return ClaimPublic(
            job=job_public(session, job),
            lease=LeasePublic(
                attempt=job.attempt,
                lease_token=job.lease_token,
                heartbeat_interval_s=state.settings.heartbeat_interval_s,
                health=HealthRulesPublic(
                    stall_step_multiple=state.settings.stall_step_multiple,
                    stall_min_s=state.settings.stall_min_s,
                    alpha_edge_searches=state.settings.alpha_edge_searches,
                ),
            ),
        )


@router.post("/jobs/{job_id}/heartbeat", response_model=HeartbeatPublic)
def heartbeat(
    job_id: JobId, body: HeartbeatRequest, session: SessionDep, agent: AgentDep, state: StateDep
) -> HeartbeatPublic:
    """Extend the lease, store progress; the reply says whether the owner asked to cancel."""
    progress = body.progress.model_dump() if body.progress else None
    with session.begin():
        cancel = queue.heartbeat(session, job_id, body.lease_token, state.policy, progress=progress)
    return HeartbeatPublic(cancel_requested=cancel)


@router.post("/jobs/{job_id}/finish", response_model=JobPublic)
def finish(job_id: JobId, body: FinishRequest, session: SessionDep, agent: AgentDep) -> JobPublic:
    """End the run as succeeded, failed (with an error) or cancelled."""
    with session.begin():
        job = queue.finish(
            session,
            job_id,
            body.lease_token,
            body.status,
            error=body.error.model_dump(exclude_none=True) if body.error else None,
        )
        return job_public(session, job)


@router.post("/jobs/{job_id}/release", response_model=JobPublic)
def release(job_id: JobId, body: ReleaseRequest, session: SessionDep, agent: AgentDep) -> JobPublic:
    """Hand a running job back: queued again at once with its attempt not counted (or cancelled
    if a cancel was requested); the lease token is refused from then on."""
    with session.begin():
        job = queue.release(session, job_id, body.lease_token, reason=body.reason)
        return job_public(session, job)


async def _body_bytes(request: Request) -> bytes:
    return await request.body()


@router.post(
    "/jobs/{job_id}/metrics",
    response_model=IngestPublic,
    openapi_extra=metrics_body.OPENAPI_BODY,
)
@metrics_body.checks_own_body
def ingest_metrics(
    job_id: JobId,
    raw: Annotated[bytes, Depends(_body_bytes)],
    agent: AgentDep,
    state: StateDep,
) -> IngestPublic:
    """Store metric points; a point already stored (same name and step) is left as it is.

    The body (`MetricsIngest`) is parsed from its bytes by service/metrics_body.py.
    """
    lease_token, points = metrics_body.parse_metrics(raw)
    _at_most(points, state.settings.max_ingest_points, "points")
    if state.engine.dialect.name == "postgresql":
        # One statement, its own transaction on the autocommit reader: lease, points, rollups.
        with state.reader() as session:
            inserted = metric_ingest_pg.ingest_fenced(
                session, job_id, lease_token, points, lease_s=state.policy.lease_timeout_s
            )
            if inserted is None:
                queue.refuse_lease(session, job_id)
    else:
        with state.writer() as session:
            inserted = _under_lease(
                session, state, job_id, lease_token,
                lambda now: metric_series.ingest(session, job_id, points, now=now),
            )  # fmt: skip
    state.instruments.metric_points.inc(len(points))
    return IngestPublic(received=len(points), inserted=inserted)


@router.post("/jobs/{job_id}/events", response_model=IngestPublic)
def ingest_events(
    job_id: JobId, body: EventsIngest, session: SessionDep, agent: AgentDep, state: StateDep
) -> IngestPublic:
    """Append events; one whose ``key`` this job already has is a replay and is dropped."""
    _at_most(body.events, state.settings.max_ingest_events, "events")
    events = [e.model_dump() for e in body.events]
    inserted = _under_lease(
        session, state, job_id, body.lease_token,
        lambda now: event_log.record_events(session, job_id, events, now=now),
    )  # fmt: skip
    state.instruments.events.inc(len(events))
    return IngestPublic(received=len(events), inserted=inserted)


@router.post("/jobs/{job_id}/logs", response_model=IngestPublic)
def ingest_logs(
    job_id: JobId, body: LogsIngest, session: SessionDep, agent: AgentDep, state: StateDep
) -> IngestPublic:
    """Store ranks' log lines under the lease's attempt; a line already received (same attempt,
    rank and seq) is a replay and is dropped. Past the job's cap the middle is dropped."""
    _at_most(body.lines, state.settings.max_ingest_log_lines, "log lines")
    lines = [line.model_dump() for line in body.lines]

    def store(now: datetime) -> int:
        attempt = session.scalar(select(Job.attempt).where(Job.id == job_id))
        assert attempt is not None
        return job_logs.ingest(
            session, job_id, attempt, lines, now=now, cap=state.settings.max_log_lines_per_job
        )

    inserted = _under_lease(session, state, job_id, body.lease_token, store)
    return IngestPublic(received=len(lines), inserted=inserted)


def _at_most(items: Sized, limit: int, what: str) -> None:
    """413 for a batch of more than `limit` items."""
    if len(items) > limit:
        raise PayloadTooLarge(f"{len(items)} {what} in one batch; at most {limit}")


def _under_lease(
    session: Session,
    state: AppState,
    job_id: int,
    lease_token: str,
    store: Callable[[datetime], int],
) -> int:
    """`store(now)`'s answer, run in one transaction that holds (and renews) the job's lease:
    a stale lease token is refused (409) before anything is written."""
    with session.begin():
        now = db_now(session)
        queue.hold_lease(session, job_id, lease_token, state.policy, now=now)
        return store(now)
