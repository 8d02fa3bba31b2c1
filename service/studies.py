"""Studies in the database: create one (study and jobs in the caller's one transaction), read its
status and counts from its jobs, cancel it, and read its jobs' metric series for the statistics.

Each function runs inside the transaction its caller opens, like service/queue.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Integer, distinct, func, literal_column, select
from sqlalchemy.orm import Session

from service import queue
from service.contract import (
    EventType,
    JobStatus,
    StudyCellPublic,
    StudyCounts,
    StudyPublic,
    StudyStatus,
)
from service.db.engine import db_now
from service.db.models import Event, Job, Metric, Study
from service.errors import JobAlreadyFinished, StudyAlreadyFinished
from service.study_expand import expand
from service.study_schemas import StudyCreate

_ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


def create_study(
    session: Session,
    *,
    owner: str,
    spec: StudyCreate,
    max_jobs: int,
    owner_key: str | None = None,
    admit: Callable[[], None] | None = None,
) -> Study:
    """Validate and expand `spec`, then store the study and its jobs, seed-major.

    Nothing is written unless every cell is valid (the caller's transaction holds it all).
    """
    cells, planned = expand(spec, max_jobs=max_jobs)
    now = db_now(session)
    study = Study(
        name=spec.name,
        owner=owner,
        spec=spec.model_dump(mode="json"),
        baseline=spec.baseline,
        seeds=list(spec.seeds),
        cells=[{"key": c.key, "arm": c.arm, "params": c.params} for c in cells],
        created_at=now,
    )
    session.add(study)
    session.flush()
    label = spec.name or f"study-{study.id}"
    for p in planned:
        # Through the queue's own enqueue, one job at a time: whatever a job needs (its owner
        # and the rest) is set as for any submitted job, and the ids (the claim order's
        # tiebreak after priority) follow the expansion order on every backend.
        queue.enqueue(
            session,
            owner=owner,
            owner_key=owner_key,
            admit=admit,
            config=p.config,
            name=f"{label}/{p.cell.key}/seed={p.seed}"[:200],
            priority=spec.priority,
            max_attempts=spec.max_attempts,
            tags=spec.tags,
            study_id=study.id,
            cell=p.cell.key,
        )
    return study


@dataclass
class _JobRow:
    id: int
    cell: str | None
    status: str
    finished_at: datetime | None


def studies_public(session: Session, studies: list[Study]) -> list[StudyPublic]:
    """The Study shape of each study: counts, status and job ids read in one query."""
    by_study: dict[int, list[_JobRow]] = {s.id: [] for s in studies}
    if studies:
        rows = session.execute(
            select(Job.study_id, Job.id, Job.cell, Job.status, Job.finished_at)
            .where(Job.study_id.in_(list(by_study)))
            .order_by(Job.study_id, Job.id)
        )
        for study_id, job_id, cell, status, finished_at in rows:
            assert study_id is not None  # (only these studies' jobs were selected)
            by_study[study_id].append(_JobRow(job_id, cell, status, finished_at))
    return [_public(s, by_study[s.id]) for s in studies]


def study_public(session: Session, study: Study) -> StudyPublic:
    return studies_public(session, [study])[0]


def _public(study: Study, jobs: list[_JobRow]) -> StudyPublic:
    counts = StudyCounts()
    job_ids: dict[str, list[int]] = {c["key"]: [] for c in study.cells}
    for job in jobs:
        setattr(counts, job.status, getattr(counts, job.status) + 1)
        job_ids.setdefault(job.cell or "", []).append(job.id)
    active = counts.queued + counts.running
    finished = [j.finished_at for j in jobs if j.finished_at is not None]
    status = StudyStatus.CANCELLED if study.cancelled_at is not None else StudyStatus.FINISHED
    if active:
        status = StudyStatus.RUNNING
    return StudyPublic(
        id=study.id,
        name=study.name,
        owner=study.owner,
        status=status,
        baseline=study.baseline,
        seeds=study.seeds,
        created_at=study.created_at,
        finished_at=max(finished) if not active and finished else None,
        counts=counts,
        cells=[StudyCellPublic(**c, job_ids=job_ids[c["key"]]) for c in study.cells],
    )


def cancel_study(session: Session, study: Study) -> Study:
    """Cancel every job of `study` not yet terminal (queued at once, running on request).

    A study cancelled before is answered again (its jobs may still be stopping); one that
    finished on its own raises `StudyAlreadyFinished`.
    """
    active = list(
        session.scalars(
            select(Job).where(Job.study_id == study.id, Job.status.in_(_ACTIVE)).order_by(Job.id)
        )
    )
    if not active and study.cancelled_at is None:
        raise StudyAlreadyFinished(f"study {study.id}: every job has already finished")
    for job in active:
        # It may have finished between the read and its row lock.
        with contextlib.suppress(JobAlreadyFinished):
            queue.cancel(session, job)
    if study.cancelled_at is None:
        study.cancelled_at = db_now(session)
    session.flush()
    return study


@dataclass
class StudyJob:
    """What the statistics need of one job of a study."""

    id: int
    cell: str
    seed: int
    status: str
    optimizer: str
    started_at: datetime | None
    finished_at: datetime | None


def study_jobs(session: Session, study_id: int) -> list[StudyJob]:
    rows = session.execute(
        select(
            Job.id, Job.cell, Job.config, Job.status, Job.started_at, Job.finished_at
        ).where(Job.study_id == study_id)
        .order_by(Job.id)
    )  # fmt: skip
    return [
        StudyJob(
            id=job_id,
            cell=cell or "",
            seed=int(config.get("seed", 0)),
            status=status,
            optimizer=str(config.get("optimizer", {}).get("name", "")),
            started_at=started,
            finished_at=finished,
        )
        for job_id, cell, config, status, started, finished in rows
    ]


def succeeded(jobs: list[StudyJob]) -> list[StudyJob]:
    return [j for j in jobs if j.status == JobStatus.SUCCEEDED.value]


def series_of(
    session: Session, study_id: int, name: str, *, only_succeeded: bool = True
) -> dict[int, list[tuple[int, float, datetime]]]:
    """{job_id: [(step, value, time), …] in step order} of metric `name`, for every job of the
    study (its succeeded ones by default), in one query over the metrics primary key."""
    jobs = select(Job.id).where(Job.study_id == study_id)
    if only_succeeded:
        jobs = jobs.where(Job.status == JobStatus.SUCCEEDED.value)
    rows = session.execute(
        select(Metric.job_id, Metric.step, Metric.value, Metric.time)
        .where(Metric.name == name, Metric.job_id.in_(jobs))
        .order_by(Metric.job_id, Metric.step)
    )
    out: dict[int, list[tuple[int, float, datetime]]] = {}
    for job_id, step, value, time in rows:
        out.setdefault(job_id, []).append((int(step), float(value), time))
    return out


def alpha_searches(session: Session, job_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    """{job_id: [data of each ``alpha_search`` event]} for `job_ids`, in one query."""
    out: dict[int, list[dict[str, Any]]] = {j: [] for j in job_ids}
    if not job_ids:
        return out
    rows = session.execute(
        select(Event.job_id, Event.data)
        .where(Event.job_id.in_(job_ids), Event.type == EventType.ALPHA_SEARCH.value)
        .order_by(Event.job_id, Event.id)
    )
    for job_id, data in rows:
        out[job_id].append(data or {})
    return out


def curve_rows(
    session: Session, study_id: int, name: str, *, max_points: int
) -> dict[int, list[tuple[int, int, float, float, float]]]:
    """{job_id: [(group, step, mean, min, max), …]} of metric `name` for every job of the study
    that reported it. Up to `max_points` distinct steps: one row per point (group = step).
    Beyond: the study's step range is cut into `max_points` buckets of equal width, the same
    edges for every job (as service/metric_series.py does for one series), aggregated in SQL.
    """
    where = (Metric.name == name, Metric.job_id.in_(select(Job.id).where(Job.study_id == study_id)))
    steps, lo, hi = session.execute(
        select(
            func.count(distinct(Metric.step)), func.min(Metric.step), func.max(Metric.step)
        ).where(*where)
    ).one()
    out: dict[int, list[tuple[int, int, float, float, float]]] = {}
    if not steps:
        return out
    if steps <= max_points:
        rows = session.execute(
            select(Metric.job_id, Metric.step, Metric.value)
            .where(*where)
            .order_by(Metric.job_id, Metric.step)
        )
        for job_id, step, value in rows:
            out.setdefault(job_id, []).append((int(step), int(step), value, value, value))
        return out
    # Integers inlined, so PostgreSQL sees one expression in SELECT and GROUP BY; "/" on
    # integers is integer division on both backends.
    lo_, n_, span = (literal_column(str(int(v)), Integer) for v in (lo, max_points, hi - lo + 1))
    bucket = ((Metric.step - lo_) * n_).op("/")(span).label("bucket")
    buckets = session.execute(
        select(
            Metric.job_id,
            bucket,
            func.max(Metric.step),
            func.avg(Metric.value),
            func.min(Metric.value),
            func.max(Metric.value),
        )
        .where(*where)
        .group_by(Metric.job_id, bucket)
        .order_by(Metric.job_id, bucket)
    )
    for job_id, group, step, mean, low, high in buckets:
        out.setdefault(job_id, []).append(
            (int(group), int(step), float(mean), float(low), float(high))
        )
    return out
