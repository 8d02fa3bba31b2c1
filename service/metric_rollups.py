"""Metric rollups: summaries of every series at bucket widths growing by 8, kept at ingest.

Level 0 has one row per series (all its points: the count, the step range and the latest
point). Level L (1..8) has a row per non-empty bucket of ``8**L`` steps, bucket
``step >> 3L``: count, sum, min, max, first and last step, and the last point (value, epoch,
time). Rows are updated in the ingest transaction from the points that were new (a replayed
point is not counted twice), by an upsert whose merge is commutative, so batches may arrive in
any order.

A query over [lo, hi] picks the coarsest level that still has at least ``max_points`` buckets
in the range, reads those rows (between max_points and 8 × max_points of them, whatever the
series length) and merges consecutive ones into at most max_points answer buckets (`plan`),
aligned to the level's grid, so the widths of two answer buckets differ by at most one level
bucket. The answer equals a scan
of the raw points over the same bucket edges (`bucket_edges`); only a bucket cut by
``since_step``/``until_step`` is summarised from raw points, and only for the cut part.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, Float, Integer, String, bindparam, select, text
from sqlalchemy.orm import Session

from service.db.models import Metric, MetricRollup, UTCDateTime
from service.metric_rollup_batch import COLUMNS as ROLLUP_COLUMNS
from service.metric_rollup_batch import LEVEL_BITS, LEVELS, SERIES_LEVEL, rollup_columns

_COLUMNS = ("job_id", *ROLLUP_COLUMNS)


@dataclass
class Summary:
    """Aggregates of a set of points of one series."""

    count: int
    sum: float
    min: float
    max: float
    first_step: int
    last_step: int
    last_value: float
    last_epoch: int | None
    last_time: datetime | None

    def merge(self, other: Summary) -> None:
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.first_step = min(self.first_step, other.first_step)
        if other.last_step > self.last_step:
            self.last_step = other.last_step
            self.last_value = other.last_value
            self.last_epoch = other.last_epoch
            self.last_time = other.last_time

    def bucket_point(self) -> dict[str, Any]:
        """The answer's form of a bucket (as GET /v1/jobs/{id}/metrics returns it)."""
        return {
            "step": self.last_step,
            "value": self.last_value,
            "epoch": self.last_epoch,
            "time": self.last_time,
            "min": self.min,
            "max": self.max,
            "mean": self.sum / self.count,
            "count": self.count,
            "step_min": self.first_step,
            "step_max": self.last_step,
        }


def rollup_rows(job_id: int, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rollup rows (every level) that `points` — each new to the series, no (name, step)
    twice — contribute, in key order (level, name, bucket)."""
    columns = rollup_columns(
        [p["name"] for p in points],
        [p["step"] for p in points],
        [p["value"] for p in points],
        [p.get("epoch") for p in points],
        [p.get("time") for p in points],
    )
    return [
        {"job_id": job_id, **dict(zip(ROLLUP_COLUMNS, row, strict=True))}
        for row in zip(*(columns[c] for c in ROLLUP_COLUMNS), strict=True)
    ]


def upsert_sets(dialect: str) -> str:
    """The ON CONFLICT ... DO UPDATE SET of a rollup row: a commutative merge."""
    least, greatest = ("least", "greatest") if dialect == "postgresql" else ("min", "max")
    t = "metric_rollups"
    newer = f"excluded.last_step > {t}.last_step"
    sets = ", ".join(
        [
            f"count = {t}.count + excluded.count",
            f"sum = {t}.sum + excluded.sum",
            f"min = {least}({t}.min, excluded.min)",
            f"max = {greatest}({t}.max, excluded.max)",
            f"first_step = {least}({t}.first_step, excluded.first_step)",
            f"last_step = {greatest}({t}.last_step, excluded.last_step)",
        ]
        + [
            f"{c} = CASE WHEN {newer} THEN excluded.{c} ELSE {t}.{c} END"
            for c in ("last_value", "last_epoch", "last_time")
        ]
    )
    return sets


# SQLite: one prepared statement, run for every row (executemany). PostgreSQL rolls up in the
# ingest statement itself (service/metric_series.py).
_UPSERT_SQLITE = text(
    f"INSERT INTO metric_rollups ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join(':' + c for c in _COLUMNS)}) "
    f"ON CONFLICT (job_id, level, name, bucket) DO UPDATE SET {upsert_sets('sqlite')}"
)


def record(session: Session, job_id: int, new_points: list[dict[str, Any]]) -> None:
    """Fold `new_points` (points just inserted, none a replay) into the rollups (SQLite)."""
    if not new_points:
        return
    rows = rollup_rows(job_id, new_points)  # in key order, as PostgreSQL's statement does
    for r in rows:
        r["last_time"] = _naive_utc(r["last_time"])
    session.execute(_UPSERT_SQLITE, rows)


def _naive_utc(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo else t


# ---- reading ------------------------------------------------------------------------------

_R = MetricRollup.__table__.c
_M = Metric.__table__.c
_SUMMARY_COLUMNS = (
    _R.count, _R.sum, _R.min, _R.max, _R.first_step, _R.last_step, _R.last_value, _R.last_epoch,
    _R.last_time,
)  # fmt: skip

#: The series rows of one job (all names): their sizes, step ranges and latest points.
SERIES = (
    select(_R.name, *_SUMMARY_COLUMNS)
    .where(_R.job_id == bindparam("job_id"), _R.level == SERIES_LEVEL)
    .order_by(_R.name)
)
_LEVEL_ROWS = (
    select(_R.bucket, *_SUMMARY_COLUMNS)
    .where(
        _R.job_id == bindparam("job_id"),
        _R.level == bindparam("level"),
        _R.name == bindparam("name"),
        _R.bucket.between(bindparam("b0"), bindparam("b1")),
    )
    .order_by(_R.bucket)
)
_RAW = (
    select(_M.step, _M.value, _M.epoch, _M.time)
    .where(
        _M.job_id == bindparam("job_id"),
        _M.name == bindparam("name"),
        _M.step.between(bindparam("lo"), bindparam("hi")),
    )
    .order_by(_M.step)
)


def summary_of(row: Any) -> Summary:
    return Summary(
        int(row.count), float(row.sum), float(row.min), float(row.max), int(row.first_step),
        int(row.last_step), float(row.last_value), row.last_epoch, row.last_time,
    )  # fmt: skip


def plan(lo: int, hi: int, max_points: int) -> tuple[int, int, int]:
    """(level, n, m): answer [lo, hi] from the `n` buckets of `level` spread over `m` buckets.

    The level is the coarsest with at least `max_points` buckets over the range (level 0: raw
    steps, when even level 1 has fewer). Level bucket i (counted from the range's first) goes
    to answer bucket ``i * m // n``: m = min(n, max_points) answer buckets, each of
    ``n // m`` or ``n // m + 1`` level buckets.
    """
    level = 0
    for candidate in range(LEVELS, 0, -1):
        shift = LEVEL_BITS * candidate
        if (hi >> shift) - (lo >> shift) + 1 >= max_points:
            level = candidate
            break
    shift = LEVEL_BITS * level
    n = (hi >> shift) - (lo >> shift) + 1
    return level, n, min(n, max_points)


def bucket_edges(lo: int, hi: int, max_points: int) -> list[tuple[int, int]]:
    """The answer buckets' step ranges [start, end] over [lo, hi], in order (empty ones too)."""
    level, n, m = plan(lo, hi, max_points)
    shift = LEVEL_BITS * level
    b0 = lo >> shift
    first = [-(-j * n // m) for j in range(m + 1)]  # the first level bucket of answer bucket j
    return [
        (max(lo, (b0 + first[j]) << shift), min(hi, ((b0 + first[j + 1]) << shift) - 1))
        for j in range(m)
    ]


def raw_points(session: Session, job_id: int, name: str, lo: int, hi: int) -> list[Any]:
    return list(session.execute(_RAW, {"job_id": job_id, "name": name, "lo": lo, "hi": hi}))


def _raw_summary(session: Session, job_id: int, name: str, lo: int, hi: int) -> Summary | None:
    total = None
    for step, value, epoch, time in raw_points(session, job_id, name, lo, hi):
        s = Summary(1, value, value, value, step, step, value, epoch, time)
        if total is None:
            total = s
        else:
            total.merge(s)
    return total


_GROUPS = """
    SELECT (bucket - :b0) * :m / :n AS j, CAST(sum(count) AS BIGINT) AS count, sum(sum) AS sum,
           min(min) AS min, max(max) AS max, min(first_step) AS first_step,
           max(last_step) AS last_step{last}
    FROM metric_rollups
    WHERE job_id = :job_id AND level = :level AND name = :name
      AND bucket BETWEEN :first AND :last
    GROUP BY 1
"""


def _merge_sql(dialect: str) -> Any:
    # The answer bucket's last point is its level row with the highest step.
    if dialect == "postgresql":
        # Within the GROUP BY: one pass over the level's rows, whatever the planner believes
        # (correlated lookups were planned as sequential scans on a young, small table, and a
        # join as a nested loop rescanning the level: 40 and 340 ms instead of a few).
        last = "".join(
            f", (array_agg({c} ORDER BY last_step DESC))[1] AS {c}"
            for c in ("last_value", "last_epoch", "last_time")
        )
        sql = _GROUPS.format(last=last) + " ORDER BY 1"
    else:
        # SQLite always looks a primary key up by its index.
        last = ", ".join(
            f"(SELECT r.{c} FROM metric_rollups AS r WHERE r.job_id = :job_id AND r.level = :level"
            f" AND r.name = :name AND r.bucket = g.last_step / :width) AS {c}"
            for c in ("last_value", "last_epoch", "last_time")
        )
        sql = f"SELECT g.*, {last} FROM ({_GROUPS.format(last='')}) AS g ORDER BY g.j"
    return (
        text(sql)
        .bindparams(bindparam("name", type_=String()))
        .columns(
            j=BigInteger(),
            count=BigInteger(),
            sum=Float(),
            min=Float(),
            max=Float(),
            first_step=BigInteger(),
            last_step=BigInteger(),
            last_value=Float(),
            last_epoch=Integer(),
            last_time=UTCDateTime(),
        )
    )


#: One level's rows over [b0, b1] merged into answer buckets in SQL (GROUP BY the answer bucket
#: j), leaving out rows cut by the range's ends: at most max_points rows come back, not up to
#: 8 times as many.
_MERGE = {d: _merge_sql(d) for d in ("postgresql", "sqlite")}


def buckets(
    session: Session, job_id: int, name: str, lo: int, hi: int, max_points: int, whole: Summary
) -> list[dict[str, Any]]:
    """The non-empty buckets of `bucket_edges(lo, hi, max_points)` in order, as answered.

    `whole` is the series' summary: a level bucket at an end of the range holds points outside
    it only if the series has points beyond that end.
    """
    level, n, m = plan(lo, hi, max_points)
    shift = LEVEL_BITS * level
    b0, b1 = lo >> shift, hi >> shift
    out: dict[int, Summary] = {}

    def add(j: int, s: Summary | None) -> None:
        if s is None:
            return
        if j in out:
            out[j].merge(s)
        else:
            out[j] = s

    if level == 0:
        for step, value, epoch, time in raw_points(session, job_id, name, lo, hi):
            add(
                (step - lo) * m // n,
                Summary(1, value, value, value, step, step, value, epoch, time),
            )
        return [out[j].bucket_point() for j in sorted(out)]
    width = 1 << shift
    cut_low = lo > whole.first_step and lo % width != 0
    cut_high = hi < whole.last_step and (hi + 1) % width != 0
    if b0 == b1 and (cut_low or cut_high):
        add(0, _raw_summary(session, job_id, name, lo, hi))
        return [s.bucket_point() for s in out.values()]
    first, last = b0, b1
    # A level bucket cut by the range's ends holds points outside it: summarise the inside part
    # from raw points (at most one level bucket's worth at each end).
    if cut_low:
        add(0, _raw_summary(session, job_id, name, lo, ((b0 + 1) << shift) - 1))
        first += 1
    if cut_high:
        add((b1 - b0) * m // n, _raw_summary(session, job_id, name, b1 << shift, hi))
        last -= 1
    merged: list[dict[str, Any]] = []
    if first <= last:
        params = {
            "job_id": job_id, "level": level, "name": name, "b0": b0, "m": m, "n": n,
            "first": first, "last": last, "width": width,
        }  # fmt: skip
        # The hot path (up to max_points rows): answer dicts straight from the rows.
        for j, count, total, low, high, step_min, step_max, value, epoch, time in session.execute(
            _MERGE[session.get_bind().dialect.name], params
        ):
            if j in out:  # merged with a cut end below
                add(j, Summary(count, total, low, high, step_min, step_max, value, epoch, time))
                continue
            merged.append(
                {
                    "step": step_max, "value": value, "epoch": epoch, "time": time,
                    "min": low, "max": high, "mean": total / count, "count": count,
                    "step_min": step_min, "step_max": step_max,
                }
            )  # fmt: skip
    ends = [s.bucket_point() for s in out.values()]
    return sorted(merged + ends, key=lambda p: p["step"]) if ends else merged


def rebuild(session: Session, job_id: int) -> None:
    """Recompute a job's rollups from its raw points, in SQL (for points written around
    `ingest`, e.g. a bulk load)."""
    session.execute(text("DELETE FROM metric_rollups WHERE job_id = :job_id"), {"job_id": job_id})
    for level in range(LEVELS + 1):
        # SERIES_LEVEL's one bucket, written as an expression (SQLite reads a bare integer in
        # GROUP BY as a column number).
        bucket = "step * 0" if level == SERIES_LEVEL else f"(step >> {LEVEL_BITS * level})"
        session.execute(
            text(
                f"""
                INSERT INTO metric_rollups ({", ".join(_COLUMNS)})
                SELECT g.job_id, {level}, g.name, g.bucket, g.n, g.s, g.lo, g.hi, g.first_step,
                       g.last_step, m.value, m.epoch, m.time
                FROM (SELECT job_id, name, {bucket} AS bucket, count(*) AS n, sum(value) AS s,
                             min(value) AS lo, max(value) AS hi, min(step) AS first_step,
                             max(step) AS last_step
                      FROM metrics WHERE job_id = :job_id GROUP BY job_id, name, {bucket}) AS g
                JOIN metrics m
                  ON m.job_id = g.job_id AND m.name = g.name AND m.step = g.last_step
                """
            ),
            {"job_id": job_id},
        )
