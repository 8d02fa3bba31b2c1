"""Alembic is the schema's only author: upgrade makes exactly the ORM's schema; downgrade undoes it."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from service_support import _require_postgres, create_pg_database, drop_pg_database, pg_url
from sqlalchemy import create_engine, inspect

from service.db.migrate import downgrade, upgrade
from service.db.models import Base


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_db(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'm.db'}"
        return
    _require_postgres()
    name = create_pg_database()
    try:
        yield pg_url(name)
    finally:
        drop_pg_database(name)


def test_upgrade_matches_the_models_and_downgrade_removes_everything(empty_db):
    upgrade(empty_db)
    engine = create_engine(empty_db)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
        upgrade(empty_db)  # a second upgrade is a no-op
        downgrade(empty_db, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        upgrade(empty_db)  # and back again
        assert {"jobs", "job_tags", "metrics", "events", "tokens"} <= set(
            inspect(engine).get_table_names()
        )
    finally:
        engine.dispose()


def test_0006_renames_the_test_sets_stored_val_series_to_test(empty_db):
    """Before the validation split, ``val/*`` was the test set: upgrading renames those points
    and their rollups (which 0005 builds from the points already stored); other series are
    untouched; downgrading gives the old names back."""
    from sqlalchemy import text

    upgrade(empty_db, "0004_job_logs")
    engine = create_engine(empty_db)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO jobs (id, owner, owner_key, status, config, priority, cpus, gpus, "
                    "attempt, max_attempts, created_at, cancel_requested) VALUES (1, 'u', "
                    "'token:1', 'succeeded', '{}', 0, 1, 0, 1, 3, '2026-11-28 00:00:00', false)"
                )
            )
            for name, step in (("val/acc", 1), ("val/acc", 2), ("val/loss", 2), ("train/loss", 2)):
                conn.execute(
                    text(
                        "INSERT INTO metrics (job_id, name, step, value, time) "
                        "VALUES (1, :n, :s, 0.5, '2026-11-28 00:00:00')"
                    ),
                    {"n": name, "s": step},
                )

        def names():
            with engine.connect() as conn:
                rows = conn.execute(text("SELECT name, step FROM metrics ORDER BY name, step"))
                return [tuple(r) for r in rows]

        def rollup_names():
            with engine.connect() as conn:
                rows = conn.execute(text("SELECT DISTINCT name FROM metric_rollups"))
                return sorted(r[0] for r in rows)

        upgrade(empty_db)
        assert names() == [("test/acc", 1), ("test/acc", 2), ("test/loss", 2), ("train/loss", 2)]
        assert rollup_names() == ["test/acc", "test/loss", "train/loss"]
        downgrade(empty_db, "0005_metric_rollups")
        assert names() == [("train/loss", 2), ("val/acc", 1), ("val/acc", 2), ("val/loss", 2)]
        assert rollup_names() == ["train/loss", "val/acc", "val/loss"]
    finally:
        engine.dispose()
