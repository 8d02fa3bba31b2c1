"""Faults survived, with real processes: a PostgreSQL restart, a killed API, agent or rank,
storage that cannot be written, a stalled stream. These tests need ray and the API's packages;
the session's Ray cluster and `xsam serve` fixtures live in tests/ray_support.py."""

import pytest

pytest.importorskip("ray")
pytest.importorskip("fastapi")


@pytest.fixture
def postgres():
    """A PostgreSQL server of the test's own, free to stop and restart (private_postgres.py)."""
    from private_postgres import PrivatePostgres

    server = PrivatePostgres().create()
    server.start()
    try:
        yield server
    finally:
        server.destroy()
