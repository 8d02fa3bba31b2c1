"""Binary array parameters (service/pg_arrays.py) read back as the values they were built from."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from service_support import _require_postgres, create_pg_database, drop_pg_database, pg_url
from sqlalchemy import create_engine, text

from service import pg_arrays

pytestmark = pytest.mark.postgres

CASES = [
    (pg_arrays.int2, "smallint", [0, 8, -(2**15), 2**15 - 1]),
    (pg_arrays.int4, "integer", [1, None, 2**31 - 1, -(2**31)]),
    (pg_arrays.int8, "bigint", [0, 2**63 - 1, -(2**63), 7]),
    (pg_arrays.float8, "float8", [0.1, -2.5e-300, 1e308, -0.0]),
    (pg_arrays.float8, "float8", [1.5, None]),
    (pg_arrays.varchar, "varchar", ["train/loss", "é/ü 😀", "", 'a"b\\\\c,{}']),
    (pg_arrays.int8, "bigint", []),
]


@pytest.fixture
def connection():
    _require_postgres()
    name = create_pg_database()
    engine = create_engine(pg_url(name))
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()
        drop_pg_database(name)


@pytest.mark.parametrize(("build", "sql_type", "values"), CASES)
def test_an_array_reads_back_as_built(connection, build, sql_type, values):
    got = connection.execute(
        text(f"SELECT CAST(:a AS {sql_type}[])"), {"a": build(values)}
    ).scalar_one()
    assert got == values


def test_times_are_stored_as_naive_utc(connection):
    aware = datetime(2026, 3, 1, 12, 30, 0, 250, tzinfo=timezone(timedelta(hours=5)))
    naive = datetime(1999, 12, 31, 23, 59, 59, 999999)  # naive is UTC already
    got = connection.execute(
        text("SELECT CAST(:a AS timestamp[])"),
        {"a": pg_arrays.timestamp([aware, None, naive, aware])},
    ).scalar_one()
    utc = aware.astimezone(UTC).replace(tzinfo=None)
    assert got == [utc, None, naive, utc]
