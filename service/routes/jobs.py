"""/v1/jobs: submit, list, read, cancel jobs; their metrics, events, logs and trained weights."""

from __future__ import annotations

import base64
import binascii
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Response
from fastapi.responses import FileResponse
from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session, lazyload

from service import events as event_log
from service import job_logs, metric_series, queue, quotas
from service.auth import Principal
from service.contract import (
    EventPublic,
    EventsPublic,
    JobPublic,
    JobsPublic,
    JobStatus,
    LatestMetricsPublic,
    LogLinePublic,
    LogsPublic,
    MetricsPublic,
)
from service.db.models import Job, JobTag
from service.deps import OwnerDep, ReadSessionDep, SessionDep, SettingsDep, StateDep
from service.errors import ArtifactNotFound, InvalidCursor, JobNotFound
from service.job_reads import job_json, jobs_public, select_jobs
from service.schemas import MAX_BIGINT, TAG_PATTERN, JobCreate, error_responses, public_job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=error_responses(400, 401, 404, 503))

#: Most jobs one page may hold; a larger ``limit`` is a 422.
MAX_PAGE_LIMIT = 200

#: A job id in a path: a negative one or one beyond the id column is a 422 (not a database
#: overflow); an id in range that names no job is a 404.
JobId = Annotated[int, Path(ge=0, le=MAX_BIGINT)]


def visible_job(session: Session, principal: Principal, job_id: int) -> Job:
    """The job, if the caller may see it; another owner's job is indistinguishable from none."""
    # Tags are read only if the caller uses them (most routes only check the owner).
    job = session.get(Job, job_id, options=[lazyload(Job.tag_rows)])
    if job is None or (not principal.is_admin and job.owner_key != principal.owner_key):
        raise JobNotFound(f"job {job_id} not found")
    return job


def visible_jobs(principal: Principal) -> list[ColumnElement[bool]]:
    """WHERE clauses that keep the jobs the caller may see (none for an admin: every job)."""
    return [] if principal.is_admin else [Job.owner_key == principal.owner_key]


def job_public(session: Session, job: Job) -> JobPublic:
    return public_job(
        job,
        latest_metrics=metric_series.latest(session, [job.id])[job.id],
        queue_position=queue.queue_position(session, job),
    )


@router.post(
    "",
    status_code=201,
    response_model=JobPublic,
    responses={
        200: {"model": JobPublic, "description": "A replay of an Idempotency-Key: that job"},
        **error_responses(403, 409, 413, 429),
    },
)
def submit_job(
    body: JobCreate,
    session: SessionDep,
    owner: OwnerDep,
    response: Response,
    settings: SettingsDep,
    state: StateDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobPublic:
    """Queue a job. A repeated ``Idempotency-Key`` from the same owner with the same body
    returns the first job (200); with a different body it is a 409 ``idempotency_key_reused``.
    Keys expire after ``XSAM_IDEMPOTENCY_KEY_TTL_S`` (24 h)."""

    def admit() -> None:  # a replay of an Idempotency-Key is not a new submit
        quotas.check_submit(
            session,
            owner,
            priority=body.priority,
            config=body.config.model_dump(mode="json"),
            settings=settings,
            limiter=state.submit_limiter,
        )

    with session.begin():
        job, created = queue.enqueue(
            session,
            owner=owner.name,
            owner_key=owner.owner_key,
            config=body.config,
            name=body.name,
            priority=body.priority,
            max_attempts=body.max_attempts,
            tags=body.tags,
            idempotency_key=idempotency_key or None,  # an empty header is no key
            idempotency_ttl=timedelta(seconds=settings.idempotency_key_ttl_s),
            admit=admit,
        )
        if not created:
            response.status_code = 200
        return job_public(session, job)


def _encode_cursor(job_id: int) -> str:
    return base64.urlsafe_b64encode(f"id:{job_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, value = raw.partition(":")
        job_id = int(value)
        if prefix != "id" or not 0 <= job_id <= MAX_BIGINT:
            raise ValueError(raw)
        return job_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidCursor(f"invalid cursor {cursor!r}") from None


@router.get("", response_model=JobsPublic)
def list_jobs(
    session: ReadSessionDep,
    owner: OwnerDep,
    status: JobStatus | None = None,
    tag: Annotated[str | None, Query(max_length=64, pattern=TAG_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_LIMIT)] = 50,
    cursor: Annotated[str | None, Query(max_length=100)] = None,
    study: Annotated[int | None, Query(ge=0, le=MAX_BIGINT, description="a study's id")] = None,
) -> JobsPublic:
    """Jobs newest first; pass ``next_cursor`` back as ``cursor`` for the next page."""
    stmt = select_jobs(session).where(*visible_jobs(owner)).order_by(Job.id.desc()).limit(limit + 1)
    if study is not None:
        stmt = stmt.where(Job.study_id == study)
    if status is not None:
        stmt = stmt.where(Job.status == status.value)
    if tag is not None:
        stmt = stmt.where(Job.id.in_(select(JobTag.job_id).where(JobTag.tag == tag)))
    if cursor:
        stmt = stmt.where(Job.id < _decode_cursor(cursor))
    items = jobs_public(session, stmt)
    more = len(items) > limit
    items = items[:limit]
    return JobsPublic(items=items, next_cursor=_encode_cursor(items[-1].id) if more else None)


@router.get("/{job_id}", response_model=JobPublic)
async def get_job(job_id: JobId, state: StateDep, owner: OwnerDep) -> Response:
    """One job with its progress, latest metrics, error and queue position."""
    # The body is JobPublic's JSON from one Core statement on a pooled connection (no Session);
    # returning a Response skips FastAPI's second validation and encoding of the model
    # (`response_model` stays for the OpenAPI document). `async def` runs the read inline on
    # the event loop: a thread-pool hop cost more CPU than the read itself (docs/api.md,
    # Benchmarks), and the read is one indexed statement.
    with state.reader.kw["bind"].connect() as connection:
        body = job_json(connection, job_id, None if owner.is_admin else owner.owner_key)
    if body is None:
        raise JobNotFound(f"job {job_id} not found")
    return Response(content=body, media_type="application/json")


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=error_responses(409))
def cancel_job(job_id: JobId, session: SessionDep, owner: OwnerDep) -> JobPublic:
    """Queued: cancelled at once. Running: the agent is told and ends it ``cancelled``."""
    with session.begin():
        job = queue.cancel(session, visible_job(session, owner, job_id))
        return job_public(session, job)


@router.get("/{job_id}/metrics", response_model=MetricsPublic)
def get_metrics(
    job_id: JobId,
    session: ReadSessionDep,
    owner: OwnerDep,
    names: Annotated[
        str | None, Query(description="comma-separated metric names", pattern=r"^[^\x00]*$")
    ] = None,
    since_step: Annotated[int | None, Query(ge=0, le=MAX_BIGINT)] = None,
    until_step: Annotated[int | None, Query(ge=0, le=MAX_BIGINT)] = None,
    max_points: Annotated[int, Query(ge=1, le=100_000)] = 1000,
) -> MetricsPublic:
    """Series per name; longer ones are downsampled into buckets (min, max, mean, last)."""
    visible_job(session, owner, job_id)
    wanted = [n.strip() for n in names.split(",") if n.strip()] if names else None
    series = metric_series.query(
        session,
        job_id,
        names=wanted,
        since_step=since_step,
        until_step=until_step,
        max_points=max_points,
    )
    return MetricsPublic.model_validate({"job_id": job_id, "series": series})


@router.get("/{job_id}/metrics/latest", response_model=LatestMetricsPublic)
def get_latest_metrics(
    job_id: JobId, session: ReadSessionDep, owner: OwnerDep
) -> LatestMetricsPublic:
    """The newest point of every series."""
    visible_job(session, owner, job_id)
    latest = metric_series.latest(session, [job_id])[job_id]
    return LatestMetricsPublic.model_validate({"job_id": job_id, "metrics": latest})


@router.get("/{job_id}/events", response_model=EventsPublic)
def get_events(
    job_id: JobId,
    session: ReadSessionDep,
    owner: OwnerDep,
    after: Annotated[int, Query(ge=0, le=MAX_BIGINT)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    type: Annotated[
        str | None, Query(max_length=64, description="only events of this type")
    ] = None,
) -> EventsPublic:
    """Events with id > ``after``, in order; pass ``next_after`` back to resume."""
    visible_job(session, owner, job_id)
    rows = event_log.list_events(session, job_id, after=after, limit=limit, type_=type)
    return EventsPublic(
        items=[
            EventPublic(id=e.id, time=e.time, type=e.type, message=e.message, data=e.data)
            for e in rows
        ],
        next_after=rows[-1].id if rows else after,
    )


@router.get("/{job_id}/logs", response_model=LogsPublic)
def get_logs(
    job_id: JobId,
    session: ReadSessionDep,
    owner: OwnerDep,
    attempt: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,
    rank: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,
    after: Annotated[int, Query(ge=0, le=MAX_BIGINT)] = 0,
    limit: Annotated[int, Query(ge=1, le=5000)] = 1000,
) -> LogsPublic:
    """The ranks' log lines with id > ``after``, in order (per rank, in the order written);
    pass ``next_after`` back to follow. ``dropped`` counts lines the per-job cap removed."""
    visible_job(session, owner, job_id)
    rows = job_logs.list_lines(
        session, job_id, after=after, limit=limit, attempt=attempt, rank=rank
    )
    return LogsPublic(
        items=[
            LogLinePublic(
                id=r.id,
                attempt=r.attempt,
                rank=r.rank,
                time=r.time,
                stream=r.stream,
                level=r.level,
                text=r.text,
            )
            for r in rows
        ],
        next_after=rows[-1].id if rows else after,
        dropped=job_logs.dropped(session, job_id),
    )


@router.get(
    "/{job_id}/artifacts/model",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def download_model(
    job_id: JobId, session: ReadSessionDep, owner: OwnerDep, settings: SettingsDep
) -> FileResponse:
    """The trained weights (a state_dict file) of a succeeded job."""
    job = visible_job(session, owner, job_id)
    if job.status != JobStatus.SUCCEEDED.value:
        raise ArtifactNotFound(f"job {job_id} is {job.status}; weights exist once it succeeded")
    path = settings.artifacts_path / f"job-{job_id}" / "model.pt"
    if not path.is_file():
        raise ArtifactNotFound(f"job {job_id} succeeded but its weights file is missing")
    return FileResponse(
        path, media_type="application/octet-stream", filename=f"job-{job_id}-model.pt"
    )
