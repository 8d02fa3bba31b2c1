"""Metrics and rollups without a foreign key to jobs: the lease fence already proves the job.

PostgreSQL checks a foreign key with a trigger per inserted row: on 1000-point batches it made
the insert cost 1.65–2.44 × the backend CPU it costs without (`bench/pg_foreign_key.py`;
docs/api.md "Benchmarks"). Every metric write is fenced by the job's lease in
the same statement or transaction (an UPDATE of the job's row that must find it running with the
lease token), so a point can only be stored for a job that exists and holds the row lock while it
is written; the service never deletes jobs. The key bought nothing but its cost. Events, logs and
tags keep theirs (their volume is small).

Revision ID: 0007_metrics_without_job_fk
Revises: 0006_test_metric_names
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007_metrics_without_job_fk"
down_revision: str | None = "0006_test_metric_names"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEYS = (("metrics", "fk_metrics_job_id_jobs"), ("metric_rollups", "fk_metric_rollups_job_id_jobs"))


def upgrade() -> None:
    for table, name in KEYS:
        # SQLite cannot drop a constraint: batch mode rebuilds the table (a copy of its rows).
        with op.batch_alter_table(table, table_kwargs={"sqlite_with_rowid": False}) as batch:
            batch.drop_constraint(name, type_="foreignkey")


def downgrade() -> None:
    for table, name in KEYS:
        # Points of a job that no longer exists could not be stored, so none can be orphaned.
        with op.batch_alter_table(table, table_kwargs={"sqlite_with_rowid": False}) as batch:
            batch.create_foreign_key(name, "jobs", ["job_id"], ["id"], ondelete="CASCADE")
