"""A job's log: the lines every rank wrote, stored with a per-job cap.

Lines arrive in batches from each rank (``POST /v1/agent/jobs/{id}/logs``), under the job's
lease; the service files them under the lease's attempt. (job, attempt, rank, seq) identifies a
line, and each (job, attempt, rank) keeps the highest seq it has received (`LogStream`): a line
at or below it is a replay and is dropped, even when the cap has since deleted the line it
repeats. A rank numbers its lines in the order it wrote them, so ids follow seq within a rank.

The cap keeps the head (the first half of the cap, where a run's setup and first errors are) and
the tail (the newest lines); when a batch takes the job past the cap, the oldest lines after the
head are deleted and counted in `LogTotal.dropped`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import CursorResult, delete, select, update
from sqlalchemy.orm import Session

from service.db.models import LogLine, LogStream, LogTotal
from service.events import dialect_insert

#: Rows per INSERT statement (9 columns: well under SQLite's bound-variable limit).
_CHUNK = 100


def ingest(
    session: Session,
    job_id: int,
    attempt: int,
    lines: list[dict[str, Any]],
    *,
    now: datetime,
    cap: int,
) -> int:
    """Store `lines` ({rank, seq, time?, stream, level?, text}) of `attempt`; returns how many
    were new. The caller holds the job's lease (its row lock serialises a job's ingests)."""
    fresh = _drop_replays(session, job_id, attempt, lines)
    if not fresh:
        return 0
    rows = [
        {
            "job_id": job_id,
            "attempt": attempt,
            "rank": line["rank"],
            "seq": line["seq"],
            "time": line.get("time") or now,
            "stream": line["stream"],
            "level": line.get("level"),
            "text": line["text"],
        }
        for line in fresh
    ]
    inserted = 0
    for i in range(0, len(rows), _CHUNK):
        stmt = (
            dialect_insert(session, LogLine)
            .values(rows[i : i + _CHUNK])
            .on_conflict_do_nothing(index_elements=["job_id", "attempt", "rank", "seq"])
            .returning(LogLine.id)
        )
        inserted += len(session.execute(stmt).all())
    _apply_cap(session, job_id, inserted, cap)
    return inserted


def _drop_replays(
    session: Session, job_id: int, attempt: int, lines: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The lines above their stream's watermark, in (rank, seq) order; moves the watermarks."""
    ordered = sorted(lines, key=lambda line: (line["rank"], line["seq"]))
    marks = dict(
        session.execute(
            select(LogStream.rank, LogStream.last_seq).where(
                LogStream.job_id == job_id, LogStream.attempt == attempt
            )
        ).all()
    )
    fresh: list[dict[str, Any]] = []
    top: dict[int, int] = {}
    for line in ordered:
        rank, seq = line["rank"], line["seq"]
        if seq <= marks.get(rank, -1) or seq <= top.get(rank, -1):
            continue  # a replay, or a duplicate within the batch
        fresh.append(line)
        top[rank] = seq
    for rank, seq in top.items():
        if rank in marks:
            session.execute(
                update(LogStream)
                .where(
                    LogStream.job_id == job_id,
                    LogStream.attempt == attempt,
                    LogStream.rank == rank,
                )
                .values(last_seq=seq)
            )
        else:
            session.add(LogStream(job_id=job_id, attempt=attempt, rank=rank, last_seq=seq))
    session.flush()
    return fresh


def _apply_cap(session: Session, job_id: int, inserted: int, cap: int) -> None:
    total = session.get(LogTotal, job_id)
    if total is None:
        total = LogTotal(job_id=job_id, kept=0, dropped=0)
        session.add(total)
    kept = total.kept + inserted
    excess = kept - cap
    if excess > 0:
        head = cap // 2
        # The last line of the head: everything after it, oldest first, is the middle.
        boundary = session.scalar(
            select(LogLine.id)
            .where(LogLine.job_id == job_id)
            .order_by(LogLine.id)
            .offset(head - 1)
            .limit(1)
        )
        # The middle's first `excess` lines are a contiguous id range after the head.
        last = session.scalar(
            select(LogLine.id)
            .where(LogLine.job_id == job_id, LogLine.id > boundary)
            .order_by(LogLine.id)
            .offset(excess - 1)
            .limit(1)
        )
        result = session.execute(
            delete(LogLine)
            .where(LogLine.job_id == job_id, LogLine.id > boundary, LogLine.id <= last)
            .execution_options(synchronize_session=False)
        )
        assert isinstance(result, CursorResult)  # (a DELETE's result: it has a rowcount)
        deleted = result.rowcount
        kept -= deleted
        total.dropped += deleted
    total.kept = kept
    session.flush()


def list_lines(
    session: Session,
    job_id: int,
    *,
    after: int,
    limit: int,
    attempt: int | None = None,
    rank: int | None = None,
) -> list[LogLine]:
    """Lines of `job_id` with id > `after`, oldest first, optionally of one attempt / rank."""
    stmt = select(LogLine).where(LogLine.job_id == job_id, LogLine.id > after)
    if attempt is not None:
        stmt = stmt.where(LogLine.attempt == attempt)
    if rank is not None:
        stmt = stmt.where(LogLine.rank == rank)
    return list(session.scalars(stmt.order_by(LogLine.id).limit(limit)))


def dropped(session: Session, job_id: int) -> int:
    """How many of the job's lines the cap has dropped."""
    return int(session.scalar(select(LogTotal.dropped).where(LogTotal.job_id == job_id)) or 0)
