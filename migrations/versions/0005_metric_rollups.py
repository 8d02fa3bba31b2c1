"""Metric rollups: per-series summaries at geometrically growing bucket widths, and the series row.

Revision ID: 0005_metric_rollups
Revises: 0004_job_logs
Create Date: 2026-11-28

Existing points are rolled up here, so a database migrated with data answers queries at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_metric_rollups"
down_revision: str | None = "0004_job_logs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the model's types and of service.metric_rollups' levels: a migration never
# imports application code.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time = sa.DateTime  # naive UTC
LEVEL_BITS = 3
LEVELS = 8


def upgrade() -> None:
    op.create_table(
        "metric_rollups",
        sa.Column("job_id", Id, nullable=False),
        sa.Column("level", sa.SmallInteger(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("bucket", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("sum", sa.Float(), nullable=False),
        sa.Column("min", sa.Float(), nullable=False),
        sa.Column("max", sa.Float(), nullable=False),
        sa.Column("first_step", sa.BigInteger(), nullable=False),
        sa.Column("last_step", sa.BigInteger(), nullable=False),
        sa.Column("last_value", sa.Float(), nullable=False),
        sa.Column("last_epoch", sa.Integer(), nullable=True),
        sa.Column("last_time", Time(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_metric_rollups_job_id_jobs", ondelete="CASCADE"
        ),
        # Level before name: a job's series rows (level 0) are one short range, so the latest
        # metrics of a job never scan its buckets.
        sa.PrimaryKeyConstraint("job_id", "level", "name", "bucket", name="pk_metric_rollups"),
        sqlite_with_rowid=False,
    )
    # Roll up what is already stored: level 0 (one row per series), then levels 1..LEVELS.
    for level in range(LEVELS + 1):
        bucket = "step * 0" if level == 0 else f"(step >> {LEVEL_BITS * level})"
        op.execute(
            f"""
            INSERT INTO metric_rollups (job_id, level, name, bucket, count, sum, min, max,
                first_step, last_step, last_value, last_epoch, last_time)
            SELECT g.job_id, {level}, g.name, g.bucket, g.n, g.s, g.lo, g.hi, g.first_step,
                   g.last_step, m.value, m.epoch, m.time
            FROM (SELECT job_id, name, {bucket} AS bucket, count(*) AS n, sum(value) AS s,
                         min(value) AS lo, max(value) AS hi, min(step) AS first_step,
                         max(step) AS last_step
                  FROM metrics GROUP BY job_id, name, {bucket}) AS g
            JOIN metrics m ON m.job_id = g.job_id AND m.name = g.name AND m.step = g.last_step
            """
        )


def downgrade() -> None:
    op.drop_table("metric_rollups")
