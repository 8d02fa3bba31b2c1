"""PostgreSQL's metrics ingest: lease check, points and rollups in one statement.

The ingest route's hot path on PostgreSQL. One statement, run on an autocommit connection so it
is its own transaction (no BEGIN, no COMMIT, no separate lease query: one round trip per batch):

1. renews the lease of the running job that holds the lease token (an UPDATE that locks the job
   row until the statement commits, so the reaper cannot requeue the job under it, and
   concurrent batches of one job are serialised on that row);
2. inserts the points from binary arrays (service/pg_arrays.py; a plain INSERT: no per-row
   conflict check, and no foreign key to check per row: migration 0007);
3. upserts the batch's rollup rows, computed here with numpy (service/metric_rollup_batch.py:
   one row per level bucket the batch touches: ~150 for 1000 steps of one series), merged by the
   same commutative ON CONFLICT as everywhere else.

Steps 2 and 3 run only if step 1 found the lease. A batch holding a point already stored (a
replay) fails step 2 with a unique violation, which rolls the whole statement back; it is then
stored by the general statement (ON CONFLICT DO NOTHING, rolling up only the points that were
new, in SQL: service/metric_series.py), with the same lease check. Replays are rare (an agent
resending a batch whose reply it lost), so the common batch pays for no conflict handling.

Measured with bench/metrics_store.py (docs/api.md, "Benchmarks"): the per-row conflict check,
the rollup aggregation in SQL and the round trips around the statement were most of the cost.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import metric_rollups, pg_arrays
from service.metric_rollup_batch import rollup_columns
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

_ROLLUP_ARRAYS = (
    ("r_levels", "level", pg_arrays.int2),
    ("r_names", "name", pg_arrays.varchar),
    ("r_buckets", "bucket", pg_arrays.int8),
    ("r_counts", "count", pg_arrays.int8),
    ("r_sums", "sum", pg_arrays.float8),
    ("r_mins", "min", pg_arrays.float8),
    ("r_maxs", "max", pg_arrays.float8),
    ("r_first_steps", "first_step", pg_arrays.int8),
    ("r_last_steps", "last_step", pg_arrays.int8),
    ("r_last_values", "last_value", pg_arrays.float8),
    ("r_last_epochs", "last_epoch", pg_arrays.int4),
    ("r_last_times", "last_time", pg_arrays.timestamp),
)


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
    names = [p["name"] for p in points]
    steps = [p["step"] for p in points]
    if len(set(zip(names, steps, strict=True))) < len(points):
        # The last occurrence of a (name, step) within one batch wins, as a replay would.
        points = list({(p["name"], p["step"]): p for p in points}.values())
        names = [p["name"] for p in points]
        steps = [p["step"] for p in points]
    values = [p["value"] for p in points]
    epochs = [p.get("epoch") for p in points]
    times = [p.get("time") for p in points]
    params: dict[str, Any] = {
        "job_id": job_id,
        "lease_token": lease_token,
        "lease_s": float(lease_s),
        "names": pg_arrays.varchar(names),
        "steps": pg_arrays.int8(steps),
        "vals": pg_arrays.float8(values),
        "epochs": pg_arrays.int4(epochs),
        "times": pg_arrays.timestamp(times),
    }
    rollups = rollup_columns(names, steps, values, epochs, times)  # in key order
    for key, column, as_array in _ROLLUP_ARRAYS:
        params[key] = as_array(rollups[column])
    try:
        held = session.execute(_FAST, params).scalar_one()
        return len(points) if held else None
    except IntegrityError as exc:
        if getattr(exc.orig, "sqlstate", None) != "23505":  # unique_violation: a replayed point
            raise
        session.rollback()
    held, inserted = session.execute(_GENERAL, {k: params[k] for k in _GENERAL_PARAMS}).one()
    return int(inserted) if held else None
