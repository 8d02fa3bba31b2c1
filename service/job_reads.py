"""Reading jobs for the API in two round trips, whatever the page size.

One query returns the jobs with their queue positions and tags (correlated subqueries, so a
page of 200 jobs costs no more statements than one job); a second returns the latest point of
each of their series, from the series rows kept at ingest (service/metric_rollups.py).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, and_, bindparam, case, func, literal, or_, select
from sqlalchemy.orm import Session, aliased, noload

from service import metric_series
from service.contract import JobPublic, JobStatus
from service.db.models import Job, JobTag
from service.schemas import public_job

_ahead = aliased(Job, name="ahead")
_QUEUED = JobStatus.QUEUED.value

#: 1-based position in claim order (priority, then age) of a queued job; null otherwise.
#: The same count as queue.queue_position, over the (status, priority, id) index.
QUEUE_POSITION = case(
    (
        Job.status == _QUEUED,
        select(func.count() + 1)
        .select_from(_ahead)
        .where(
            _ahead.status == _QUEUED,
            or_(
                _ahead.priority > Job.priority,
                and_(_ahead.priority == Job.priority, _ahead.id < Job.id),
            ),
        )
        .correlate(Job)
        .scalar_subquery(),
    ),
    else_=None,
)


def _tags(dialect: str) -> Any:
    # Tags match TAG_PATTERN, which has no comma.
    if dialect == "postgresql":
        joined = func.string_agg(JobTag.tag, literal(","))
    else:
        joined = func.group_concat(JobTag.tag, ",")
    return select(joined).where(JobTag.job_id == Job.id).correlate(Job).scalar_subquery()


def select_jobs(session: Session) -> Select[Any]:
    """SELECT jobs with their queue position and comma-joined tags; add WHERE/ORDER/LIMIT."""
    dialect = session.get_bind().dialect.name
    return select(
        Job, QUEUE_POSITION.label("queue_position"), _tags(dialect).label("tags")
    ).options(noload(Job.tag_rows))


_BY_ID: dict[tuple[str, bool], Select[Any]] = {}


def job_by_id(session: Session, job_id: int, owner_key: str | None = None) -> JobPublic | None:
    """One job as `jobs_public` gives it, or None; with ``owner_key``, only if that owner's (so
    another owner's job is indistinguishable from none). The statement is built once per
    dialect (bound parameters), so SQLAlchemy finds its compiled form without building it again."""
    key = (session.get_bind().dialect.name, owner_key is not None)
    stmt = _BY_ID.get(key)
    if stmt is None:
        stmt = select_jobs(session).where(Job.id == bindparam("job_id"))
        if owner_key is not None:
            stmt = stmt.where(Job.owner_key == bindparam("owner_key"))
        _BY_ID[key] = stmt
    params: dict[str, Any] = {"job_id": job_id}
    if owner_key is not None:
        params["owner_key"] = owner_key
    found = jobs_public(session, stmt, params)
    return found[0] if found else None


def jobs_public(
    session: Session, stmt: Select[Any], params: dict[str, Any] | None = None
) -> list[JobPublic]:
    """The jobs `stmt` (from `select_jobs`) selects, with their latest metrics: two queries."""
    rows = session.execute(stmt, params).all()
    latest = metric_series.latest(session, [job.id for job, _, _ in rows])
    out = []
    for job, position, tags in rows:
        public = public_job(job, latest_metrics=latest[job.id], queue_position=position)
        public.tags = sorted(tags.split(",")) if tags else []
        out.append(public)
    return out
