"""Metric series: idempotent bulk ingest, the latest values, and downsampled queries.

A series is the points of one (job, name), keyed by step. Ingest inserts a batch and folds
the points that were new into the rollups (service/metric_rollups.py) in the caller's
transaction (on PostgreSQL in one statement; the ingest route on PostgreSQL uses
service/metric_ingest_pg.py, which checks the lease in that statement too). A query for more points than ``max_points`` is answered
from the rollups with at most ``max_points`` buckets, each keeping min, max, mean, count and
its last point: its cost depends on max_points, not on the series' length, and a one-step
spike survives in its bucket's ``max``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select, text
from sqlalchemy.orm import Session

from service import metric_rollups, pg_arrays
from service.db.models import Metric, MetricRollup
from service.events import dialect_insert

#: Largest step (the BIGINT column's maximum).
MAX_BIGINT = 2**63 - 1
#: Rows per INSERT: well under SQLite's bound-parameter limit.
_CHUNK = 1000


def ingest(session: Session, job_id: int, points: list[dict[str, Any]], *, now: datetime) -> int:
    """Insert `points` ({name, step, value, epoch?, time?}); a point already stored is ignored.

    The new points are rolled up in the same transaction. Returns how many points were new.
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
    new = [rows[key] for key in _insert_sqlite(session, values)]
    metric_rollups.record(session, job_id, new)
    return len(new)


def _insert_sqlite(session: Session, values: list[dict[str, Any]]) -> list[tuple[str, int]]:
    stmt = (
        dialect_insert(session, Metric.__table__)
        .on_conflict_do_nothing(index_elements=["job_id", "name", "step"])
        # rowcount is not reliable for batched inserts on every driver; RETURNING is.
        .returning(Metric.__table__.c.name, Metric.__table__.c.step)
    )
    # Core executemany: SQLAlchemy batches it into multi-row INSERTs ("insertmanyvalues")
    # with one compiled statement, far cheaper than compiling a VALUES list per batch.
    connection = session.connection()
    new: list[tuple[str, int]] = []
    for start in range(0, len(values), _CHUNK):
        new.extend(tuple(r) for r in connection.execute(stmt, values[start : start + _CHUNK]))
    return new


# One statement per batch: the points travel as five binary arrays (no per-row parameters),
# and the points that were new (RETURNING) are rolled up at every level by the same statement.
PG_INGEST = text(
    f"""
    WITH new AS (
        INSERT INTO metrics (job_id, name, step, value, epoch, time)
        SELECT :job_id, p.* FROM unnest(
            CAST(:names AS varchar[]), CAST(:steps AS bigint[]), CAST(:vals AS float8[]),
            CAST(:epochs AS integer[]), CAST(:times AS timestamp[])
        ) AS p
        ON CONFLICT (job_id, name, step) DO NOTHING
        RETURNING name, step, value, epoch, time
    ), level1 AS (
        -- Level 1 from the points, then every level from level 1's rows (8 x fewer than the
        -- points): the statement aggregates ~1.1 rows per point, not one per point and level.
        SELECT name, step >> {metric_rollups.LEVEL_BITS} AS bucket, count(*) AS count,
               sum(value) AS sum, min(value) AS min, max(value) AS max,
               min(step) AS first_step, max(step) AS last_step,
               (array_agg(value ORDER BY step DESC))[1] AS last_value,
               (array_agg(epoch ORDER BY step DESC))[1] AS last_epoch,
               (array_agg(time ORDER BY step DESC))[1] AS last_time
        FROM new GROUP BY name, step >> {metric_rollups.LEVEL_BITS}
    ), cells AS (
        SELECT l.level, c.name,
               CASE WHEN l.level = {metric_rollups.SERIES_LEVEL} THEN 0
                    ELSE c.bucket >> ({metric_rollups.LEVEL_BITS} * (l.level - 1)) END AS bucket,
               c.count, c.sum, c.min, c.max, c.first_step, c.last_step, c.last_value,
               c.last_epoch, c.last_time
        FROM level1 AS c CROSS JOIN generate_series(0, {metric_rollups.LEVELS}) AS l(level)
    ), rolled AS (
        INSERT INTO metric_rollups (job_id, level, name, bucket, count, sum, min, max,
                                    first_step, last_step, last_value, last_epoch, last_time)
        SELECT :job_id, level, name, bucket, sum(count), sum(sum), min(min), max(max),
               min(first_step), max(last_step),
               (array_agg(last_value ORDER BY last_step DESC))[1],
               (array_agg(last_epoch ORDER BY last_step DESC))[1],
               (array_agg(last_time ORDER BY last_step DESC))[1]
        FROM cells
        GROUP BY level, name, bucket
        ORDER BY level, name, bucket  -- key order: concurrent batches cannot deadlock
        ON CONFLICT (job_id, level, name, bucket) DO UPDATE SET
        {metric_rollups.upsert_sets("postgresql")}
    )
    SELECT count(*) FROM new
    """
)


def _ingest_postgresql(session: Session, job_id: int, rows: list[dict[str, Any]]) -> int:
    result = session.execute(
        PG_INGEST,
        {
            "job_id": job_id,
            "names": pg_arrays.varchar([r["name"] for r in rows]),
            "steps": pg_arrays.int8([r["step"] for r in rows]),
            "vals": pg_arrays.float8([r["value"] for r in rows]),
            "epochs": pg_arrays.int4([r["epoch"] for r in rows]),
            "times": pg_arrays.timestamp([r["time"] for r in rows]),
        },
    )
    return int(result.scalar_one())


_R = MetricRollup.__table__.c
#: The latest point of every series of some jobs: their series rows (level 0), kept at ingest.
_LATEST = select(
    _R.job_id, _R.name, _R.last_step, _R.last_value, _R.last_epoch, _R.last_time
).where(
    _R.job_id.in_(bindparam("job_ids", expanding=True)),
    _R.level == metric_rollups.SERIES_LEVEL,
)


def latest(session: Session, job_ids: list[int]) -> dict[int, dict[str, dict[str, Any]]]:
    """{job_id: {name: point}} with the newest (highest-step) point of every series."""
    if not job_ids:
        return {}
    out: dict[int, dict[str, dict[str, Any]]] = {j: {} for j in job_ids}
    for job_id, name, step, value, epoch, time in session.execute(_LATEST, {"job_ids": job_ids}):
        out[job_id][name] = _point(step, value, epoch, time)
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
    """{name: points} in step order; series longer than `max_points` come back as buckets.

    A series with no point in the range is left out.
    """
    wanted = set(names) if names else None
    series: dict[str, list[dict[str, Any]]] = {}
    for row in session.execute(metric_rollups.SERIES, {"job_id": job_id}).all():
        name = row.name
        if wanted is not None and name not in wanted:
            continue
        whole = metric_rollups.summary_of(row)
        lo = whole.first_step if since_step is None else max(whole.first_step, since_step)
        hi = whole.last_step if until_step is None else min(whole.last_step, until_step)
        if lo > hi:
            continue
        whole_range = lo == whole.first_step and hi == whole.last_step
        if whole_range and whole.count <= max_points:
            points = _raw(session, job_id, name, lo, hi)
        else:
            buckets = metric_rollups.buckets(session, job_id, name, lo, hi, max_points, whole)
            if sum(b["count"] for b in buckets) <= max_points:  # a sparse range: its points
                points = _raw(session, job_id, name, lo, hi)
            else:
                points = buckets
        if points:
            series[name] = points
    return series


def _raw(session: Session, job_id: int, name: str, lo: int, hi: int) -> list[dict[str, Any]]:
    return [_point(*row) for row in metric_rollups.raw_points(session, job_id, name, lo, hi)]
