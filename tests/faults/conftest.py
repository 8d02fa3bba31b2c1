"""Faults survived, with real processes: a PostgreSQL restart, a killed API, agent or rank,
storage that cannot be written, a stalled stream. These tests need ray and the API's packages;
the session's Ray cluster and `xsam serve` fixtures live in tests/ray_support.py, the processes
these tests start and kill in fault_support.py."""

from collections.abc import Iterator

import pytest

pytest.importorskip("ray")
pytest.importorskip("fastapi")


@pytest.fixture
def postgres() -> Iterator:
    """A started PostgreSQL server of the test's own, free to stop and restart; stopped and
    deleted afterwards (throwaway_postgres.py). Skips with the reason where none can run,
    unless XSAM_REQUIRE_POSTGRES=1."""
    from throwaway_postgres import throwaway_postgres

    with throwaway_postgres() as server:
        yield server
