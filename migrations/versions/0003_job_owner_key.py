"""Jobs are owned by a unique identity (the token's id), not by a free-text name.

Adds ``jobs.owner_key`` ("token:<id>", or "env:<name>" for a secret from the API's
environment), indexes it, and moves the Idempotency-Key's uniqueness from (owner, key) to
(owner_key, key). Existing rows are backfilled from the tokens table: a name held by exactly
one token becomes that token's key; ``admin``/``agent`` with no token row were the
environment's secrets; any other name (held by several tokens, or by none) becomes
``legacy:<name>``, which no caller holds, so only admins see those jobs — which of the
same-named tokens submitted them cannot be known.

Revision ID: 0003_job_owner_key
Revises: 0002_studies
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_job_owner_key"
down_revision: str | None = "0002_studies"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

jobs = sa.table(
    "jobs",
    sa.column("id", sa.BigInteger),
    sa.column("owner", sa.String),
    sa.column("owner_key", sa.String),
    sa.column("idempotency_key", sa.String),
)
tokens = sa.table("tokens", sa.column("id", sa.BigInteger), sa.column("name", sa.String))


def _owner_key(name: str, token_ids: list[int]) -> str:
    if len(token_ids) == 1:
        return f"token:{token_ids[0]}"
    if not token_ids and name in ("admin", "agent"):
        return f"env:{name}"
    return f"legacy:{name}"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("owner_key", sa.String(length=220), nullable=True))
    bind = op.get_bind()
    holders: dict[str, list[int]] = defaultdict(list)
    for token_id, name in bind.execute(sa.select(tokens.c.id, tokens.c.name)):
        holders[name].append(int(token_id))
    owners = [row[0] for row in bind.execute(sa.select(jobs.c.owner).distinct())]
    for name in owners:
        bind.execute(
            jobs.update()
            .where(jobs.c.owner == name)
            .values(owner_key=_owner_key(name, holders.get(name, [])))
        )
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("owner_key", existing_type=sa.String(length=220), nullable=False)
        batch.drop_constraint("uq_jobs_owner_idempotency_key", type_="unique")
        batch.create_unique_constraint(
            "uq_jobs_owner_key_idempotency_key", ["owner_key", "idempotency_key"]
        )
        batch.create_index("ix_jobs_owner_key_id", ["owner_key", "id"])


def downgrade() -> None:
    # Same-named owners may share a key now; keep it on the oldest job only.
    first = (
        sa.select(sa.func.min(jobs.c.id))
        .where(jobs.c.idempotency_key.is_not(None))
        .group_by(jobs.c.owner, jobs.c.idempotency_key)
    )
    op.get_bind().execute(
        jobs.update()
        .where(jobs.c.idempotency_key.is_not(None), jobs.c.id.not_in(first))
        .values(idempotency_key=None)
    )
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_owner_key_id")
        batch.drop_constraint("uq_jobs_owner_key_idempotency_key", type_="unique")
        batch.create_unique_constraint(
            "uq_jobs_owner_idempotency_key", ["owner", "idempotency_key"]
        )
        batch.drop_column("owner_key")
