"""Reading jobs for the API in two round trips, whatever the page size.

One query returns the jobs with their queue positions and tags (correlated subqueries, so a
page of 200 jobs costs no more statements than one job); a second returns the latest point of
each of their series, from the series rows kept at ingest (service/metric_rollups.py).
"""

from __future__ import annotations

import json
from datetime import UTC
from types import SimpleNamespace
from typing import Any

import psycopg
from psycopg.types.string import TextLoader
from sqlalchemy import Connection, Select, and_, bindparam, case, func, literal, or_, select
from sqlalchemy.orm import Session, aliased, noload

from service import metric_rollups, metric_series
from service.contract import JobPublic, JobStatus, MetricPoint
from service.db.models import Job, JobTag, MetricRollup
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


_JOB_COLUMNS = [
    c for c in Job.__table__.c if c.key not in ("lease_token", "idempotency_key", "owner_key")
]
_SERIES = MetricRollup.__table__
_ONE: dict[tuple[str, bool], _OneJob] = {}


def _one_job_statement(dialect: str, by_owner: bool) -> Select[Any]:
    """The job's columns, queue position and tags, LEFT JOINed to its series rows (one row per
    series, or one row with null series columns): the job and its latest metrics in one round
    trip, read from one snapshot."""
    stmt = (
        select(
            *_JOB_COLUMNS,
            QUEUE_POSITION.label("queue_position"),
            _tags(dialect).label("tags"),
            _SERIES.c.name.label("series_name"),
            _SERIES.c.last_step,
            _SERIES.c.last_value,
            _SERIES.c.last_epoch,
            _SERIES.c.last_time,
        )
        .select_from(
            Job.__table__.outerjoin(
                _SERIES,
                and_(
                    _SERIES.c.job_id == Job.__table__.c.id,
                    _SERIES.c.level == metric_rollups.SERIES_LEVEL,
                ),
            )
        )
        .where(Job.__table__.c.id == bindparam("job_id"))
    )
    if by_owner:
        stmt = stmt.where(Job.__table__.c.owner_key == bindparam("owner_key"))
    return stmt


def job_json(connection: Connection, job_id: int, owner_key: str | None = None) -> bytes | None:
    """`job_by_id`'s answer as JSON bytes, from one statement (no ORM objects): what get-job
    sends as is. The bytes are JobPublic's own serializer's, so they say exactly what the model
    would."""
    dialect = connection.dialect.name
    key = (dialect, owner_key is not None)
    one = _ONE.get(key)
    if one is None:
        stmt = _one_job_statement(dialect, owner_key is not None)
        one = _ONE[key] = _OneJob(stmt, connection.dialect)
    params: dict[str, Any] = {"job_id": job_id}
    if owner_key is not None:
        params["owner_key"] = owner_key
    rows = one.rows(connection, params)
    if not rows:
        return None
    first = rows[0]
    latest = {
        row["series_name"]: MetricPoint(
            step=int(row["last_step"]),
            value=float(row["last_value"]),
            epoch=row["last_epoch"],
            time=row["last_time"],
        )
        for row in rows
        if row["series_name"] is not None
    }
    job = SimpleNamespace(**first)
    job.tags = sorted(first["tags"].split(",")) if first["tags"] else []
    public = public_job(job, queue_position=first["queue_position"])  # type: ignore[arg-type]
    public.latest_metrics = latest
    return JobPublic.__pydantic_serializer__.to_json(public)


_KEYS = ("job_id", "owner_key")


class _OneJob:
    """get-job's statement, and on PostgreSQL its SQL run on the driver's own cursor.

    SQLAlchemy's execution (a result object, column metadata from the cursor, typed rows) cost
    more CPU than the database spent on the query (get-job's server CPU fell from 0.83–1.00 to
    0.59–0.67 ms a request without it: `bench/api_load.py`'s "cpu ms"). On PostgreSQL the
    statement's SQL, compiled once, runs on the pooled psycopg connection as a prepared
    statement, and the rows are decoded here: the timestamp columns (naive UTC, `UTCDateTime`)
    made aware, the JSON columns decoded once (they repeat on every series row). Should the
    driver fail (a dropped connection), the statement runs again through SQLAlchemy, which
    raises its own error, discards the dead connections, and the app answers 503 as for any
    other route.
    """

    _TIMES = ("created_at", "started_at", "finished_at", "last_time")
    _JSON = ("config", "progress", "error")  # job_json reads them from the first row only

    def __init__(self, stmt: Select[Any], dialect: Any) -> None:
        self.stmt = stmt
        self.names = list(stmt.selected_columns.keys())
        self.times = [self.names.index(n) for n in self._TIMES]
        self.json = [self.names.index(n) for n in self._JSON]
        self.sql: str | None = None
        if dialect.name == "postgresql":
            compiled = stmt.compile(dialect=dialect)
            self.sql = compiled.string
            # The statement's own constants (statuses, the series level) as bound values.
            self.constants = {
                k: v
                for k, v in compiled.construct_params(dict.fromkeys(_KEYS)).items()
                if k not in _KEYS
            }

    def rows(self, connection: Connection, params: dict[str, Any]) -> list[dict[str, Any]]:
        if self.sql is not None:
            try:
                with connection.connection.driver_connection.cursor() as cursor:  # type: ignore[union-attr]
                    # JSON columns as text: the job's repeat on every series row; decoded once.
                    cursor.adapters.register_loader("json", TextLoader)
                    cursor.execute(self.sql, {**self.constants, **params}, prepare=True)
                    raw = cursor.fetchall()
            except psycopg.Error:
                pass  # SQLAlchemy's path below raises (and cleans up) as everywhere else
            else:
                out = []
                for n, values in enumerate(raw):
                    row = list(values)
                    for i in self.times:
                        if row[i] is not None:
                            row[i] = row[i].replace(tzinfo=UTC)
                    for i in self.json:
                        row[i] = json.loads(row[i]) if n == 0 and row[i] is not None else None
                    out.append(dict(zip(self.names, row, strict=True)))
                return out
        return [dict(r._mapping) for r in connection.execute(self.stmt, params)]
