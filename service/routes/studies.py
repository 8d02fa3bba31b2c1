"""/v1/studies: submit a study (arms × grid × seeds as ordinary jobs), list, read, cancel it,
and its statistics: the summary against the baseline and the curves over seeds."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service import quotas, study_stats
from service import studies as store
from service.auth import Principal
from service.contract import StudiesPublic, StudyCurves, StudyPublic, StudySummary
from service.db.models import Job, Study
from service.deps import OwnerDep, ReadSessionDep, SessionDep, SettingsDep, StateDep
from service.errors import JobNotFound, StudyNotFound
from service.routes.jobs import (
    MAX_PAGE_LIMIT,
    _decode_cursor,
    _encode_cursor,
    visible_job,
    visible_jobs,
)
from service.schemas import MAX_BIGINT, error_responses
from service.study_schemas import StudyCreate

router = APIRouter(
    prefix="/v1/studies",
    tags=["studies"],
    responses=error_responses(400, 401, 403, 404, 409, 413, 429, 503),
)

StudyId = Annotated[int, Path(ge=0, le=MAX_BIGINT)]
MetricName = Annotated[str, Query(min_length=1, max_length=128, pattern=r"^[^\x00]*$")]


def visible_study(session: Session, principal: Principal, study_id: int) -> Study:
    """The study, if the caller may see it; another owner's study is indistinguishable from none.

    A study is visible exactly when its jobs are: the check is the jobs' own (`visible_job`),
    so it follows whatever rule decides who sees a job.
    """
    study = session.get(Study, study_id)
    first_job = session.scalar(select(func.min(Job.id)).where(Job.study_id == study_id))
    if study is None or first_job is None:
        raise StudyNotFound(f"study {study_id} not found")
    try:
        visible_job(session, principal, first_job)
    except JobNotFound:
        raise StudyNotFound(f"study {study_id} not found") from None
    return study


@router.post("", status_code=201, response_model=StudyPublic)
def submit_study(
    body: StudyCreate,
    session: SessionDep,
    owner: OwnerDep,
    settings: SettingsDep,
    state: StateDep,
) -> StudyPublic:
    """Expand the study into jobs, seed-major, in one transaction; a bad cell stores nothing.

    The quotas apply as to a submit (one submit of the rate; the priority cap; the base
    config's option sizes), and the queued-jobs quota to every job it expands into."""
    with session.begin():
        quotas.check_submit(
            session,
            owner,
            priority=body.priority,
            config=body.base.model_dump(mode="json"),
            settings=settings,
            limiter=state.submit_limiter,
        )
        study = store.create_study(
            session,
            owner=owner.name,
            owner_key=owner.owner_key,
            spec=body,
            max_jobs=settings.max_study_jobs,
            admit=lambda: quotas.check_queued(session, owner, settings),
        )
        return store.study_public(session, study)


@router.get("", response_model=StudiesPublic)
def list_studies(
    session: ReadSessionDep,
    owner: OwnerDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_LIMIT)] = 50,
    cursor: Annotated[str | None, Query(max_length=100)] = None,
) -> StudiesPublic:
    """Studies newest first; pass ``next_cursor`` back as ``cursor`` for the next page."""
    stmt = select(Study).order_by(Study.id.desc()).limit(limit + 1)
    if clauses := visible_jobs(owner):
        stmt = stmt.where(Study.id.in_(select(Job.study_id).where(*clauses)))
    if cursor:
        stmt = stmt.where(Study.id < _decode_cursor(cursor))
    studies = list(session.scalars(stmt))
    more = len(studies) > limit
    studies = studies[:limit]
    return StudiesPublic(
        items=store.studies_public(session, studies),
        next_cursor=_encode_cursor(studies[-1].id) if more else None,
    )


@router.get("/{study_id}", response_model=StudyPublic)
def get_study(study_id: StudyId, session: ReadSessionDep, owner: OwnerDep) -> StudyPublic:
    """One study: status, counts by job status, and its cells with their job ids."""
    return store.study_public(session, visible_study(session, owner, study_id))


@router.post("/{study_id}/cancel", response_model=StudyPublic)
def cancel_study(study_id: StudyId, session: SessionDep, owner: OwnerDep) -> StudyPublic:
    """Cancel every job of the study not yet terminal (running ones stop within seconds)."""
    with session.begin():
        study = store.cancel_study(session, visible_study(session, owner, study_id))
        return store.study_public(session, study)


@router.get("/{study_id}/summary", response_model=StudySummary)
def get_summary(
    study_id: StudyId,
    session: ReadSessionDep,
    owner: OwnerDep,
    metric: MetricName = "test/acc",
    mode: Literal["max", "min"] = "max",
    target: Annotated[float | None, Query(allow_inf_nan=False)] = None,
) -> StudySummary:
    """Per cell over its succeeded jobs: final, best, last-5, wall time, per seed; each cell
    paired by seed with the baseline arm at the same grid point; time to ``target``."""
    study = visible_study(session, owner, study_id)
    jobs = store.succeeded(store.study_jobs(session, study.id))
    series = store.series_of(session, study.id, metric)
    xsam_jobs = [j.id for j in jobs if j.optimizer == "xsam"]
    alpha_series = store.series_of(session, study.id, "xsam/alpha") if xsam_jobs else {}
    searches = store.alpha_searches(session, xsam_jobs)
    by_cell: dict[str, list[store.StudyJob]] = {}
    for job in jobs:
        by_cell.setdefault(job.cell, []).append(job)
    cells = []
    for c in study.cells:
        mine = by_cell.get(c["key"], [])
        runs = study_stats.CellRuns(
            key=c["key"],
            arm=c["arm"],
            params=c["params"],
            series={j.seed: series.get(j.id, []) for j in mine},
            started={j.seed: j.started_at for j in mine},
            wall_s=[
                (j.finished_at - j.started_at).total_seconds()
                for j in mine
                if j.started_at is not None and j.finished_at is not None
            ],
        )
        xsam = [j for j in mine if j.optimizer == "xsam"]
        if xsam:
            runs.alpha = study_stats.alpha_stats(
                [alpha_series[j.id][-1][1] for j in xsam if alpha_series.get(j.id)],
                (data for j in xsam for data in searches[j.id]),
            )
        cells.append(runs)
    return StudySummary(
        study_id=study.id,
        metric=metric,
        mode=mode,
        target=target,
        cells=study_stats.summarize(cells, mode=mode, target=target, baseline=study.baseline),
    )


@router.get("/{study_id}/curves", response_model=StudyCurves)
def get_curves(
    study_id: StudyId,
    session: ReadSessionDep,
    owner: OwnerDep,
    name: MetricName = "test/acc",
    max_points: Annotated[int, Query(ge=1, le=100_000)] = 1000,
) -> StudyCurves:
    """Per cell, at each step: mean, sd, min, max over the seeds that reported it (n)."""
    study = visible_study(session, owner, study_id)
    cell_of = {j.id: j.cell for j in store.study_jobs(session, study.id)}
    rows = store.curve_rows(session, study.id, name, max_points=max_points)
    by_cell: dict[str, dict[int, list[tuple[int, int, float, float, float]]]] = {
        c["key"]: {} for c in study.cells
    }
    for job_id, job_rows in rows.items():
        by_cell[cell_of[job_id]][job_id] = job_rows
    return StudyCurves(
        study_id=study.id,
        name=name,
        cells={key: study_stats.curve(jobs) for key, jobs in by_cell.items()},
    )
