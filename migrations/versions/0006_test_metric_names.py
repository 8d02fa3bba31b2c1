"""Metric names: the test set's series are ``test/loss``, ``test/acc`` (no longer ``val/*``).

Until ``data.val_fraction`` existed, fit() reported the test set as ``val/loss``, ``val/acc``,
``val/acc_best`` and ``val/acc_last5``;
``val/*`` now means the validation split held out of the training set. Every stored ``val/*``
point predates that split, so it is the test set and is renamed. Events keep the names they were
written with (an old ``epoch_done`` says ``val/acc`` for the test accuracy). Upgrade agents with
the service: an old agent would still report the test set as ``val/*``.

Revision ID: 0006_test_metric_names
Revises: 0005_metric_rollups
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_test_metric_names"
down_revision: str | None = "0005_metric_rollups"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RENAMES = (
    ("val/loss", "test/loss"),
    ("val/acc", "test/acc"),
    ("val/acc_best", "test/acc_best"),
    ("val/acc_last5", "test/acc_last5"),
)


def _rename(old: str, new: str) -> None:
    # A job that already has the new name keeps it (cannot happen on upgrade; on downgrade a
    # job with a real validation split keeps its val/* and its test/* stay as they are). The
    # rollups (0005) are summaries of the same series, keyed by name too: renamed alike.
    for table in ("metrics", "metric_rollups"):
        op.execute(
            sa.text(
                f"UPDATE {table} SET name = :new WHERE name = :old AND NOT EXISTS "
                f"(SELECT 1 FROM {table} AS m2 WHERE m2.job_id = {table}.job_id "
                "AND m2.name = :new)"
            ).bindparams(old=old, new=new)
        )


def upgrade() -> None:
    for old, new in RENAMES:
        _rename(old, new)


def downgrade() -> None:
    for old, new in RENAMES:
        _rename(new, old)
