"""Fresh databases for the benchmarks: a SQLite file in a temporary directory, or a new
PostgreSQL database (dropped afterwards). PostgreSQL: $XSAM_BENCH_PG (a libpq DSN of a role that
may CREATE DATABASE), default ``host=127.0.0.1 user=postgres dbname=postgres``."""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

PG_ADMIN = os.environ.get("XSAM_BENCH_PG", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")


@contextlib.contextmanager
def fresh_database(kind: str) -> Iterator[tuple[str, Path]]:
    """(SQLAlchemy URL, scratch data dir) of an empty database of `kind` (sqlite|postgres)."""
    with tempfile.TemporaryDirectory(prefix=f"xsam-bench-{kind}-") as tmp:
        data_dir = Path(tmp)
        if kind == "sqlite":
            yield f"sqlite:///{data_dir / 'xsam.db'}", data_dir
            return
        import psycopg

        name = f"xsam_bench_{secrets.token_hex(4)}"
        params = psycopg.conninfo.conninfo_to_dict(PG_ADMIN)
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        host = params.get("host", "127.0.0.1")
        user = params.get("user", "postgres")
        port = params.get("port", 5432)
        password = f":{params['password']}" if params.get("password") else ""
        try:
            yield f"postgresql+psycopg://{user}{password}@{host}:{port}/{name}", data_dir
        finally:
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]
