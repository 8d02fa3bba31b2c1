"""The ORM tables. Alembic (migrations/) is the schema's only author; this module describes it.

Times are stored as naive UTC and come back as aware UTC (`UTCDateTime`); they are always taken
from the database's clock (`service.db.engine.db_now`), never from the API host's.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Stable constraint names, so migrations can address them on every backend.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets 64-bit ids.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """A naive-UTC column that hands out aware UTC datetimes."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Study(Base):
    """A study: one request expanded into jobs (arms × grid × seeds); see service/study_expand.py.

    Its status and counts are derived from its jobs' statuses on read; only a cancel is stored.
    """

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str | None] = mapped_column(String(200))
    owner: Mapped[str] = mapped_column(String(200))
    #: The request as submitted (base, arms, grid, seeds, baseline, queue options).
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    baseline: Mapped[str | None] = mapped_column(String(100))
    seeds: Mapped[list[int]] = mapped_column(JSON)
    #: The cells in expansion order: [{key, arm, params}].
    cells: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_studies_owner_id", "owner", "id"),)


class Job(Base):
    """One training job; the jobs table is also the queue (see service/queue.py)."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str | None] = mapped_column(String(200))
    # The owner's display name (the token's name) ...
    owner: Mapped[str] = mapped_column(String(200))
    # ... and who owns the job: "token:<id>", or "env:<name>" for a secret from the API's
    # environment (service.auth.Principal.owner_key). Names may repeat; this never does.
    owner_key: Mapped[str] = mapped_column(String(220))
    status: Mapped[str] = mapped_column(String(16))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    # Resources the job needs, denormalised from config.resources so the claim query can filter.
    cpus: Mapped[float] = mapped_column(Float)
    gpus: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Not claimable before this time (retry backoff).
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime)
    agent_id: Mapped[str | None] = mapped_column(String(200))
    lease_token: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Set on the jobs a study expanded into: the study and the cell's key (null otherwise).
    study_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("studies.id"))
    cell: Mapped[str | None] = mapped_column(String(500))

    tag_rows: Mapped[list[JobTag]] = relationship(
        back_populates="job", cascade="all, delete-orphan", lazy="selectin", order_by="JobTag.tag"
    )

    __table_args__ = (
        # The claim query's order: WHERE status = 'queued' ORDER BY priority DESC, id.
        Index("ix_jobs_claim_order", "status", "priority", "id"),
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
        Index("ix_jobs_owner_id", "owner", "id"),
        Index("ix_jobs_owner_key_id", "owner_key", "id"),
        Index("ix_jobs_study_id", "study_id", "id"),
        UniqueConstraint("owner_key", "idempotency_key", name="uq_jobs_owner_key_idempotency_key"),
    )

    @property
    def tags(self) -> list[str]:
        return sorted(t.tag for t in self.tag_rows)


class JobTag(Base):
    """A job's tags, one row each, so that ``?tag=`` is an index lookup on every backend."""

    __tablename__ = "job_tags"

    job_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(String(64), primary_key=True)
    job: Mapped[Job] = relationship(back_populates="tag_rows")

    __table_args__ = (Index("ix_job_tags_tag_job", "tag", "job_id"),)


class Metric(Base):
    """One point of one series; the primary key (job_id, name, step) makes ingest idempotent."""

    __tablename__ = "metrics"

    # No foreign key to jobs: every write is fenced by the job's lease in the same statement
    # (its row is found running and locked), and its per-row check cost about as much as the
    # insert itself (migration 0007, bench/pg_foreign_key.py).
    job_id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    value: Mapped[float] = mapped_column(Float)
    epoch: Mapped[int | None] = mapped_column(Integer)
    time: Mapped[datetime] = mapped_column(UTCDateTime)

    # SQLite: store rows in the primary-key b-tree itself, so a series is one sequential range
    # (a rowid table would cost a lookup per point when scanning or downsampling it).
    __table_args__ = ({"sqlite_with_rowid": False},)


class MetricRollup(Base):
    """A summary of one series' points in one bucket (see service/metric_rollups.py).

    Level 0 holds one row per series (bucket 0: every point); level L >= 1 holds the points with
    ``step >> (3 * L) == bucket``, i.e. buckets of 8**L steps.
    """

    __tablename__ = "metric_rollups"

    job_id: Mapped[int] = mapped_column(BigId, primary_key=True)  # no key to jobs: see Metric
    level: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)
    sum: Mapped[float] = mapped_column(Float)
    min: Mapped[float] = mapped_column(Float)
    max: Mapped[float] = mapped_column(Float)
    first_step: Mapped[int] = mapped_column(BigInteger)
    last_step: Mapped[int] = mapped_column(BigInteger)
    last_value: Mapped[float] = mapped_column(Float)
    last_epoch: Mapped[int | None] = mapped_column(Integer)
    last_time: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = ({"sqlite_with_rowid": False},)


class Event(Base):
    """A lifecycle event or log line; an event whose (job_id, key) exists is a replay."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(BigId, ForeignKey("jobs.id", ondelete="CASCADE"))
    time: Mapped[datetime] = mapped_column(UTCDateTime)
    type: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    key: Mapped[str | None] = mapped_column(String(200))

    __table_args__ = (
        Index("ix_events_job_id_id", "job_id", "id"),
        UniqueConstraint("job_id", "key", name="uq_events_job_id_key"),
    )


class LogLine(Base):
    """One line a rank wrote (stdout, stderr or a logging record); see service/job_logs.py.

    (job_id, attempt, rank, seq) is unique: a replayed batch inserts nothing.
    """

    __tablename__ = "log_lines"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(BigId, ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    rank: Mapped[int] = mapped_column(Integer)
    seq: Mapped[int] = mapped_column(BigInteger)
    time: Mapped[datetime] = mapped_column(UTCDateTime)
    stream: Mapped[str] = mapped_column(String(16))
    level: Mapped[str | None] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(Text)

    __table_args__ = (
        Index("ix_log_lines_job_id_id", "job_id", "id"),
        UniqueConstraint(
            "job_id", "attempt", "rank", "seq", name="uq_log_lines_job_id_attempt_rank_seq"
        ),
    )


class LogStream(Base):
    """The highest seq received from one rank of one attempt: a line at or below it is a
    replay, even when the cap has since deleted the line it repeats."""

    __tablename__ = "log_streams"

    job_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_seq: Mapped[int] = mapped_column(BigInteger)


class LogTotal(Base):
    """Per job: how many log lines are stored and how many the cap dropped."""

    __tablename__ = "log_totals"

    job_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    kept: Mapped[int] = mapped_column(BigInteger)
    dropped: Mapped[int] = mapped_column(BigInteger)


class Token(Base):
    """A bearer token: only the SHA-256 of its secret is stored."""

    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
