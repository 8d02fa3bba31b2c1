"""A job's event log: lifecycle events recorded by the service, log lines sent by the agent.

Events are read in id order and resumed with ``after=<last id seen>``. An event that carries a
``key`` already present for its job is a replay (e.g. after a resumed attempt) and is dropped.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service.db.models import Event


def dialect_insert(session: Session, table: Any) -> postgresql.Insert | sqlite.Insert:
    """An INSERT that knows ``ON CONFLICT DO NOTHING`` on both backends."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def record_events(
    session: Session, job_id: int, events: list[dict[str, Any]], *, now: datetime
) -> int:
    """Insert `events` ({type, message, data?, key?, time?}); returns how many were new."""
    if not events:
        return 0
    rows = [
        {
            "job_id": job_id,
            "time": e.get("time") or now,
            "type": e["type"],
            "message": e.get("message") or "",
            "data": e.get("data"),
            "key": e.get("key"),
        }
        for e in events
    ]
    stmt = (
        dialect_insert(session, Event)
        .on_conflict_do_nothing(index_elements=["job_id", "key"])
        .returning(Event.id)
    )
    inserted = 0
    # One statement per event keeps their ids in the order given on both backends.
    for row in rows:
        inserted += len(session.execute(stmt.values(**row)).all())
    return inserted


def record_event(
    session: Session,
    job_id: int,
    type_: str,
    message: str,
    *,
    now: datetime,
    data: dict[str, Any] | None = None,
) -> None:
    """Record one lifecycle event (claimed, requeued, cancel_requested, finished, failed…)."""
    record_events(session, job_id, [{"type": type_, "message": message, "data": data}], now=now)


def list_events(
    session: Session, job_id: int, *, after: int, limit: int, type_: str | None = None
) -> list[Event]:
    """Events of `job_id` with id > `after` (of one type, if given), oldest first."""
    stmt = select(Event).where(Event.job_id == job_id, Event.id > after)
    if type_ is not None:
        stmt = stmt.where(Event.type == type_)
    return list(session.scalars(stmt.order_by(Event.id).limit(limit)))
