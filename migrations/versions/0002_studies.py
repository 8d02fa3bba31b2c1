"""Studies: the studies table, and the jobs' study_id and cell columns.

Revision ID: 0002_studies
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_studies"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the model's types: a migration never imports application code.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time = sa.DateTime  # naive UTC


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("baseline", sa.String(length=100), nullable=True),
        sa.Column("seeds", sa.JSON(), nullable=False),
        sa.Column("cells", sa.JSON(), nullable=False),
        sa.Column("created_at", Time(), nullable=False),
        sa.Column("cancelled_at", Time(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_studies"),
    )
    op.create_index("ix_studies_owner_id", "studies", ["owner", "id"])
    # Batch mode: SQLite cannot add a foreign key to an existing table in place (the table is
    # copied); PostgreSQL gets plain ALTER TABLE statements.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("study_id", Id, nullable=True))
        batch.add_column(sa.Column("cell", sa.String(length=500), nullable=True))
        batch.create_foreign_key("fk_jobs_study_id_studies", "studies", ["study_id"], ["id"])
        batch.create_index("ix_jobs_study_id", ["study_id", "id"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_study_id")
        batch.drop_constraint("fk_jobs_study_id_studies", type_="foreignkey")
        batch.drop_column("cell")
        batch.drop_column("study_id")
    op.drop_index("ix_studies_owner_id", table_name="studies")
    op.drop_table("studies")
