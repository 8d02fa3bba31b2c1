"""Engines and sessions for SQLite (embedded) and PostgreSQL (production).

SQLite runs in WAL mode; a writing transaction starts with ``BEGIN IMMEDIATE`` so that two
writers never both read and then fight over the upgrade to a write lock (which SQLite would
answer with "database is locked" at once, without waiting). Read-only sessions begin deferred,
so readers never wait for writers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

log = logging.getLogger(__name__)
T = TypeVar("T")

_BEGIN_OPTION = "xsam_sqlite_begin"
_LOCK_HELD = "xsam_write_lock"


def is_sqlite(url_or_engine: str | Engine) -> bool:
    url = url_or_engine.url if isinstance(url_or_engine, Engine) else make_url(url_or_engine)
    return url.get_backend_name() == "sqlite"


def make_engine(
    url: str, *, pool_size: int = 20, max_overflow: int = 40, busy_timeout_s: float = 60.0
) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout and immediate write transactions."""
    if not is_sqlite(url):
        # No pre-ping: it is a round trip per request. A connection the server dropped (a
        # PostgreSQL restart) fails one request (503; the agent retries heartbeats and ingest),
        # and SQLAlchemy then discards the pool's older connections
        # (tests/faults/test_postgres_restart.py, test_restarts_database.py).
        return create_engine(
            url,
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_recycle=600,
            # A statement's parameters (lease tokens, token hashes) never reach an error
            # message or a log line.
            hide_parameters=True,
        )
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        hide_parameters=True,
        connect_args={"timeout": busy_timeout_s, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Let SQLAlchemy's "begin" event, not pysqlite, decide how transactions start.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    # SQLite's busy handler polls with growing sleeps, so contended writers see long tails.
    # Writers of this process queue on a lock first and reach BEGIN IMMEDIATE one at a time;
    # SQLite's own lock still guards everything (other processes, and the gap at commit).
    write_lock = threading.Lock()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(_BEGIN_OPTION, "IMMEDIATE")
        if mode == "IMMEDIATE" and write_lock.acquire(timeout=busy_timeout_s):
            conn.info[_LOCK_HELD] = write_lock
        try:
            conn.exec_driver_sql(f"BEGIN {mode}")
        except BaseException:
            _release(conn.info)
            raise

    @event.listens_for(engine, "commit")
    @event.listens_for(engine, "rollback")
    def _on_end(conn: Connection) -> None:
        _release(conn.info)

    @event.listens_for(engine.pool, "reset")
    def _on_reset(_dbapi_connection: Any, record: ConnectionPoolEntry, _state: Any) -> None:
        _release(record.info)  # never let a connection go back to the pool with the lock

    @event.listens_for(engine.pool, "invalidate")
    def _on_invalidate(
        _dbapi_connection: Any, record: ConnectionPoolEntry, _exception: BaseException | None
    ) -> None:
        _release(record.info)

    return engine


def _release(info: dict) -> None:
    lock = info.pop(_LOCK_HELD, None)
    if lock is not None:
        lock.release()


def make_sessionmakers(engine: Engine) -> tuple[sessionmaker[Session], sessionmaker[Session]]:
    """(writer, reader) session factories; on SQLite the reader begins DEFERRED.

    On PostgreSQL the reader runs in autocommit: no BEGIN/ROLLBACK round trips around a read
    (each statement sees its own snapshot, which reads that never write can afford).
    """
    writer = sessionmaker(engine, expire_on_commit=False)
    if engine.dialect.name == "postgresql":
        read_engine = engine.execution_options(isolation_level="AUTOCOMMIT")
    else:
        read_engine = engine.execution_options(**{_BEGIN_OPTION: "DEFERRED"})
    reader = sessionmaker(read_engine, expire_on_commit=False)
    return writer, reader


def db_now(session: Session) -> datetime:
    """The database's clock, as aware UTC (never the API host's clock)."""
    bind = session.get_bind()
    if bind.dialect.name == "sqlite":
        raw = session.execute(text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")).scalar_one()
        return datetime.fromisoformat(raw).replace(tzinfo=UTC)
    value = session.execute(text("SELECT CURRENT_TIMESTAMP")).scalar_one()
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def _is_locked(exc: OperationalError) -> bool:
    return "database is locked" in str(exc.orig) or "database is busy" in str(exc.orig)


def run_in_transaction(
    factory: sessionmaker[Session], work: Callable[[Session], T], *, retries: int = 20
) -> T:
    """Run `work` in one short transaction, retried when SQLite reports the file locked."""
    for attempt in range(retries + 1):
        try:
            with factory() as session, session.begin():
                return work(session)
        except OperationalError as exc:
            if not _is_locked(exc) or attempt == retries:
                raise
            log.debug("database locked, retrying (%d)", attempt + 1)
            time.sleep(min(0.01 * 2**attempt, 0.5))
    raise AssertionError("unreachable")


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on error."""
    with factory() as session, session.begin():
        yield session
