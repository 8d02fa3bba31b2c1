"""PostgreSQL's metrics ingest: lease check, points and rollups in one statement.

The ingest route's hot path on PostgreSQL. One statement, run on an autocommit connection so it
is its own transaction (no BEGIN, no COMMIT, no separate lease query: one round trip per batch):

1. renews the lease of the running job that holds the lease token (an UPDATE that locks the job
   row until the statement commits, so the reaper cannot requeue the job under it, and
   concurrent batches of one job are serialised on that row);
2. inserts the points from arrays (a plain INSERT: no per-row conflict check);
3. upserts the batch's rollup rows, computed here in Python from the points (one row per level
   bucket the batch touches, ~150 for 1000 consecutive steps, merged by the same commutative
   ON CONFLICT as everywhere else).

Steps 2 and 3 run only if step 1 found the lease. A batch holding a point already stored (a
replay) fails step 2 with a unique violation, which rolls the whole statement back; it is then
stored by the general statement (ON CONFLICT DO NOTHING, rolling up only the points that were
new, in SQL: service/metric_series.py), with the same lease check. Replays are rare (an agent
resending a batch whose reply it lost), so the common batch pays for no conflict handling.

Measured with bench/metrics_store.py (docs/api.md, "Benchmarks"): the per-row conflict check,
the rollup aggregation in SQL and the round trips around the statement were most of the cost.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import metric_rollups
from service.metric_series import PG_INGEST
from service.queue import JobStatus

_NOW_UTC = "(CURRENT_TIMESTAMP AT TIME ZONE 'UTC')"

#: The lease fence of every agent write (queue._under_lease), renewing the lease as
#: queue.hold_lease does; yields one row (the database's clock) only if the lease is held.
_LEASE = f"""
    lease AS (
        UPDATE jobs SET lease_expires_at = {_NOW_UTC} + :lease_s * interval '1 second'
        WHERE id = :job_id AND lease_token = :lease_token
          AND status = '{JobStatus.RUNNING.value}'
        RETURNING {_NOW_UTC} AS now
    )
"""

_POINTS = """
    unnest(
        CAST(:names AS varchar[]), CAST(:steps AS bigint[]), CAST(:vals AS float8[]),
        CAST(:epochs AS integer[]), CAST(:times AS timestamp[])
    ) AS p(name, step, value, epoch, time)
"""

_FAST = text(
    f"""
    WITH {_LEASE}, points AS (
        INSERT INTO metrics (job_id, name, step, value, epoch, time)
        SELECT :job_id, p.name, p.step, p.value, p.epoch, COALESCE(p.time, lease.now)
        FROM lease, {_POINTS}
    ), rolled AS (
        INSERT INTO metric_rollups (job_id, level, name, bucket, count, sum, min, max,
                                    first_step, last_step, last_value, last_epoch, last_time)
        SELECT :job_id, r.level, r.name, r.bucket, r.count, r.sum, r.min, r.max, r.first_step,
               r.last_step, r.last_value, r.last_epoch, COALESCE(r.last_time, lease.now)
        FROM lease, unnest(
            CAST(:r_levels AS smallint[]), CAST(:r_names AS varchar[]),
            CAST(:r_buckets AS bigint[]), CAST(:r_counts AS bigint[]), CAST(:r_sums AS float8[]),
            CAST(:r_mins AS float8[]), CAST(:r_maxs AS float8[]),
            CAST(:r_first_steps AS bigint[]), CAST(:r_last_steps AS bigint[]),
            CAST(:r_last_values AS float8[]), CAST(:r_last_epochs AS integer[]),
            CAST(:r_last_times AS timestamp[])
        ) AS r(level, name, bucket, count, sum, min, max, first_step, last_step, last_value,
               last_epoch, last_time)
        ON CONFLICT (job_id, level, name, bucket) DO UPDATE SET
        {metric_rollups.upsert_sets("postgresql")}
    )
    SELECT count(*) FROM lease
    """
)

# The general statement (metric_series.PG_INGEST: ON CONFLICT DO NOTHING, rollups of the new
# points in SQL) behind the same fence: its points come from the lease's row, so nothing is
# written when the lease is not held.
_GENERAL_SQL = (
    PG_INGEST.text.replace("WITH new AS (", f"WITH {_LEASE}, new AS (", 1)
    .replace("SELECT :job_id, p.* FROM unnest(", "SELECT :job_id, p.name, p.step, p.value, "
             "p.epoch, COALESCE(p.time, lease.now) FROM lease, unnest(", 1)
    .replace(") AS p\n", ") AS p(name, step, value, epoch, time)\n", 1)
    .replace("SELECT count(*) FROM new", "SELECT (SELECT count(*) FROM lease), "
             "(SELECT count(*) FROM new)", 1)
)  # fmt: skip
assert _GENERAL_SQL.count("lease.now") == 1 and "FROM lease" in _GENERAL_SQL, "PG_INGEST changed"
_GENERAL = text(_GENERAL_SQL)
_GENERAL_PARAMS = ("job_id", "lease_token", "lease_s", "names", "steps", "vals", "epochs", "times")

_ROLLUP_COLUMNS = (
    ("r_levels", "level"), ("r_names", "name"), ("r_buckets", "bucket"), ("r_counts", "count"),
    ("r_sums", "sum"), ("r_mins", "min"), ("r_maxs", "max"), ("r_first_steps", "first_step"),
    ("r_last_steps", "last_step"), ("r_last_values", "last_value"),
    ("r_last_epochs", "last_epoch"), ("r_last_times", "last_time"),
)  # fmt: skip


def ingest_fenced(
    session: Session,
    job_id: int,
    lease_token: str,
    points: list[dict[str, Any]],
    *,
    lease_s: float,
) -> int | None:
    """Store `points` ({name, step, value, epoch?, time?}) of the job that `lease_token` holds,
    renewing its lease; a point already stored is ignored. Returns how many points were new, or
    None (nothing written) when no running job holds the lease.

    `session` must be on an autocommit connection (the reader of `make_sessionmakers` on
    PostgreSQL): the statement is its own transaction.
    """
    # The last occurrence of a (name, step) within one batch wins, as a replay would.
    naive: dict[datetime | None, datetime | None] = {None: None}  # most points share a time
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for p in points:
        t = p.get("time")
        if t is not None and t not in naive:
            naive[t] = t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo else t
        rows[p["name"], p["step"]] = {
            "name": p["name"], "step": p["step"], "value": p["value"], "epoch": p.get("epoch"),
            "time": naive[t],
        }  # fmt: skip
    values = list(rows.values())
    array = metric_rollups.pg_array
    params: dict[str, Any] = {
        "job_id": job_id,
        "lease_token": lease_token,
        "lease_s": float(lease_s),
        "names": array([p["name"] for p in values]),
        "steps": array([p["step"] for p in values]),
        "vals": array([p["value"] for p in values]),
        "epochs": array([p["epoch"] for p in values]),
        "times": array([p["time"] for p in values]),
    }
    rollups = metric_rollups.rollup_rows(job_id, values)
    rollups.sort(key=lambda r: (r["level"], r["name"], r["bucket"]))  # key order, as elsewhere
    for key, column in _ROLLUP_COLUMNS:
        params[key] = array([r[column] for r in rollups])
    try:
        held = session.execute(_FAST, params).scalar_one()
        return len(values) if held else None
    except IntegrityError as exc:
        if getattr(exc.orig, "sqlstate", None) != "23505":  # unique_violation: a replayed point
            raise
        session.rollback()
    held, inserted = session.execute(_GENERAL, {k: params[k] for k in _GENERAL_PARAMS}).one()
    return int(inserted) if held else None
