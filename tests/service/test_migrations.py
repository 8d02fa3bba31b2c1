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
