"""Metric series: idempotent ingest, the latest values, and downsampling done in SQL.

A series is the points of one (job, name), keyed by step. A query for more points than
``max_points`` is answered with at most ``max_points`` buckets of equal step width, each keeping
min, max, mean, count and its last point, computed by a GROUP BY over the (job_id, name, step)
primary-key index: a series is never loaded whole into memory, and a one-step spike survives in
its bucket's ``max``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, func, literal_column, select, text
from sqlalchemy.orm import Session

from service.db.models import Metric
from service.events import dialect_insert

#: Largest step (the BIGINT column's maximum).
MAX_BIGINT = 2**63 - 1
#: Rows per INSERT: well under SQLite's bound-parameter limit.
_CHUNK = 1000


def ingest(session: Session, job_id: int, points: list[dict[str, Any]], *, now: datetime) -> int:
    """Insert `points` ({name, step, value, epoch?, time?}); a point already stored is ignored.

    Returns how many points were new.
    """
    # The last occurrence of a (name, step) within one batch wins, as a replay would.
    rows = {
        (p["name"], p["step"]): {
            "job_id": job_id,
            "name": p["name"],
            "step": p["step"],
            "value": p["value"],
            "epoch": p.get("epoch"),
            "time": p.get("time") or now,
        }
        for p in points
    }
    values = list(rows.values())
    if session.get_bind().dialect.name == "postgresql":
        return _ingest_postgresql(session, job_id, values)
    stmt = (
        dialect_insert(session, Metric.__table__)
        .on_conflict_do_nothing(index_elements=["job_id", "name", "step"])
        # rowcount is not reliable for batched inserts on every driver; RETURNING is.
        .returning(Metric.__table__.c.step)
    )
    # Core executemany: SQLAlchemy batches it into multi-row INSERTs ("insertmanyvalues")
    # with one compiled statement, far cheaper than compiling a VALUES list per batch.
    connection = session.connection()
    inserted = 0
    for start in range(0, len(values), _CHUNK):
        inserted += len(connection.execute(stmt, values[start : start + _CHUNK]).all())
    return inserted


# Six array parameters instead of six per row: no per-row parameter parsing, one plan.
_PG_INGEST = text(
    """
    INSERT INTO metrics (job_id, name, step, value, epoch, time)
    SELECT :job_id, p.* FROM unnest(
        CAST(:names AS varchar[]), CAST(:steps AS bigint[]), CAST(:vals AS float8[]),
        CAST(:epochs AS integer[]), CAST(:times AS timestamp[])
    ) AS p
    ON CONFLICT (job_id, name, step) DO NOTHING
    RETURNING step
    """
)


def _naive_utc(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo else t


def _ingest_postgresql(session: Session, job_id: int, rows: list[dict[str, Any]]) -> int:
    result = session.execute(
        _PG_INGEST,
        {
            "job_id": job_id,
            "names": [r["name"] for r in rows],
            "steps": [r["step"] for r in rows],
            "vals": [r["value"] for r in rows],
            "epochs": [r["epoch"] for r in rows],
            "times": [_naive_utc(r["time"]) for r in rows],
        },
    )
    return len(result.all())


def latest(session: Session, job_ids: list[int]) -> dict[int, dict[str, dict[str, Any]]]:
    """{job_id: {name: point}} with the newest (highest-step) point of every series."""
    if not job_ids:
        return {}
    newest = (
        select(Metric.job_id, Metric.name, func.max(Metric.step).label("step"))
        .where(Metric.job_id.in_(job_ids))
        .group_by(Metric.job_id, Metric.name)
        .subquery()
    )
    stmt = select(Metric).join(
        newest,
        and_(
            Metric.job_id == newest.c.job_id,
            Metric.name == newest.c.name,
            Metric.step == newest.c.step,
        ),
    )
    out: dict[int, dict[str, dict[str, Any]]] = {j: {} for j in job_ids}
    for m in session.scalars(stmt):
        out[m.job_id][m.name] = _point(m.step, m.value, m.epoch, m.time)
    return out


def _point(step: int, value: float, epoch: int | None, time: datetime | None) -> dict[str, Any]:
    return {"step": int(step), "value": float(value), "epoch": epoch, "time": time}


def query(
    session: Session,
    job_id: int,
    *,
    names: list[str] | None = None,
    since_step: int | None = None,
    until_step: int | None = None,
    max_points: int = 1000,
) -> dict[str, list[dict[str, Any]]]:
    """{name: points} in step order; series longer than `max_points` come back as buckets."""
    bounds = [Metric.job_id == job_id]
    if names:
        bounds.append(Metric.name.in_(names))
    if since_step is not None:
        bounds.append(Metric.step >= since_step)
    if until_step is not None:
        bounds.append(Metric.step <= until_step)
    sizes = session.execute(
        select(Metric.name, func.count(), func.min(Metric.step), func.max(Metric.step))
        .where(*bounds)
        .group_by(Metric.name)
        .order_by(Metric.name)
    ).all()
    series: dict[str, list[dict[str, Any]]] = {}
    for name, count, lo, hi in sizes:
        where = [*bounds, Metric.name == name]
        if count <= max_points:
            rows = session.execute(
                select(Metric.step, Metric.value, Metric.epoch, Metric.time)
                .where(*where)
                .order_by(Metric.job_id, Metric.name, Metric.step)
            )
            series[name] = [_point(*row) for row in rows]
        else:
            series[name] = _buckets(session, job_id, name, where, int(lo), int(hi), max_points)
    return series


def _buckets(
    session: Session, job_id: int, name: str, where: list[Any], lo: int, hi: int, n: int
) -> list[dict[str, Any]]:
    # Bucket b holds steps with (step - lo) // width == b, width = ceil(span / n): at most n
    # buckets of equal width. Dividing by the width (not multiplying by n first) keeps every
    # intermediate within the steps' own range: (step - lo) * n overflowed BIGINT on
    # PostgreSQL and silently became a float on SQLite (four buckets for max_points=1).
    span = hi - lo + 1  # up to 2**63: Python computes it, the database never sees it
    width = -(-span // n)
    if width > MAX_BIGINT:  # only for n == 1 over the whole step range: one bucket
        # (an expression, not a bare 0, which GROUP BY would read as a column position)
        bucket = (Metric.step * literal_column("0")).label("bucket")
    else:
        # Integers inlined (not bound) so PostgreSQL sees the same expression in SELECT and
        # GROUP BY. Plain "/" on integers is integer division on both backends (SQLAlchemy's
        # "//" would wrap it in FLOOR(), a float, on PostgreSQL).
        lo_, width_ = literal_column(str(int(lo))), literal_column(str(int(width)))
        # self_group(): a custom operator would not parenthesise its left side by itself.
        bucket = (Metric.step - lo_).self_group().op("/")(width_).label("bucket")
    if session.get_bind().dialect.name == "postgresql":
        # At most n groups: hashing them is always right, but a planner with stale statistics
        # (a freshly ingested series) would sort the whole series instead. The penalty that
        # setting adds to the final 1000-row sort would make the plan look costly enough to
        # JIT-compile, which takes longer than the query itself: no JIT either.
        session.execute(text("SET LOCAL enable_sort = off"))
        session.execute(text("SET LOCAL jit = off"))
    agg = (
        select(
            bucket,
            func.min(Metric.value).label("min"),
            func.max(Metric.value).label("max"),
            func.avg(Metric.value).label("mean"),
            func.count().label("count"),
            func.min(Metric.step).label("step_min"),
            func.max(Metric.step).label("step_max"),
        )
        .where(*where)
        .group_by(bucket)
        .subquery()
    )
    # The bucket's last point is a primary-key lookup per bucket (correlated scalar subqueries,
    # so no planner, however stale its statistics, can turn this into a join over the series).
    last = Metric.__table__.alias("last")

    def at_last(column: Any) -> Any:
        return (
            select(column)
            .where(last.c.job_id == job_id, last.c.name == name, last.c.step == agg.c.step_max)
            .scalar_subquery()
        )

    stmt = select(
        agg,
        at_last(last.c.value).label("value"),
        at_last(last.c.epoch).label("epoch"),
        at_last(last.c.time).label("time"),
    ).order_by(agg.c.step_max)
    return [
        {
            "step": int(r.step_max),
            "value": float(r.value),
            "epoch": r.epoch,
            "time": r.time,
            "min": float(r.min),
            "max": float(r.max),
            "mean": float(r.mean),
            "count": int(r.count),
            "step_min": int(r.step_min),
            "step_max": int(r.step_max),
        }
        for r in session.execute(stmt)
    ]
