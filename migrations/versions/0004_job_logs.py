"""Job logs: every rank's lines (log_lines), each stream's replay watermark (log_streams), and
per job how many lines are stored and how many the cap dropped (log_totals).

Revision ID: 0004_job_logs
Revises: 0003_job_owner_key
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_job_logs"
down_revision: str | None = "0003_job_owner_key"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the model's types: a migration never imports application code.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time = sa.DateTime  # naive UTC


def _job_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["job_id"], ["jobs.id"], name=f"fk_{table}_job_id_jobs", ondelete="CASCADE"
    )


def upgrade() -> None:
    op.create_table(
        "log_lines",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("job_id", Id, nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("time", Time(), nullable=False),
        sa.Column("stream", sa.String(length=16), nullable=False),
        sa.Column("level", sa.String(length=16), nullable=True),
        sa.Column("text", sa.Text(), nullable=False),
        _job_fk("log_lines"),
        sa.PrimaryKeyConstraint("id", name="pk_log_lines"),
        sa.UniqueConstraint(
            "job_id", "attempt", "rank", "seq", name="uq_log_lines_job_id_attempt_rank_seq"
        ),
    )
    op.create_index("ix_log_lines_job_id_id", "log_lines", ["job_id", "id"])
    op.create_table(
        "log_streams",
        sa.Column("job_id", Id, nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        _job_fk("log_streams"),
        sa.PrimaryKeyConstraint("job_id", "attempt", "rank", name="pk_log_streams"),
    )
    op.create_table(
        "log_totals",
        sa.Column("job_id", Id, nullable=False),
        sa.Column("kept", sa.BigInteger(), nullable=False),
        sa.Column("dropped", sa.BigInteger(), nullable=False),
        _job_fk("log_totals"),
        sa.PrimaryKeyConstraint("job_id", name="pk_log_totals"),
    )


def downgrade() -> None:
    op.drop_table("log_totals")
    op.drop_table("log_streams")
    op.drop_index("ix_log_lines_job_id_id", table_name="log_lines")
    op.drop_table("log_lines")
