"""A PostgreSQL restart or outage under a running `xsam serve`, on a PostgreSQL of the test's own
(tests/faults/throwaway_postgres.py): the API answers 503 with Retry-After while the database is
away (never a 500, never a hang), serves again once it is back without being restarted itself,
and loses nothing that it acknowledged."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from fault_support import Api
from process_support import free_port
from ray_support import tiny_config

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture
def http(postgres, tmp_path) -> Iterator[httpx.Client]:
    """Raw HTTP to `xsam serve --no-agent` (no Ray needed) on the private server."""
    api = Api(tmp_path / "serve", free_port(), XSAM_DATABASE_URL=postgres.url).start()
    try:
        headers = {"Authorization": f"Bearer {api.token}"}
        with httpx.Client(base_url=api.url, headers=headers, timeout=30) as client:
            yield client
    finally:
        api.stop()


def submit(http: httpx.Client, name: str) -> httpx.Response:
    return http.post("/v1/jobs", json={"name": name, "config": tiny_config()})


def job_names(http: httpx.Client) -> list[str]:
    response = http.get("/v1/jobs", params={"limit": 100})
    assert response.status_code == 200, response.text
    return sorted(job["name"] for job in response.json()["items"])


def assert_database_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "database_unavailable"
    assert response.headers["Retry-After"] == "1"


@pytest.mark.timeout(180)
def test_a_restart_costs_at_most_one_503_and_nothing_acknowledged_is_lost(http, postgres):
    assert submit(http, "before").status_code == 201

    # Every pooled connection now belongs to the old server process.
    postgres.restart()
    first = submit(http, "after-1")
    if first.status_code != 201:
        # Without a pre-ping the first request on a dropped connection fails; SQLAlchemy then
        # discards every connection older than that, so the retry the 503 asks for works.
        assert_database_unavailable(first)
    for name in ("after-2", "after-3"):
        response = submit(http, name)
        assert response.status_code == 201, response.text
    assert http.get("/readyz").status_code == 200

    acknowledged = ["after-1"] if first.status_code == 201 else []
    assert job_names(http) == sorted(["before", "after-2", "after-3", *acknowledged])


@pytest.mark.timeout(180)
def test_while_postgres_is_down_every_call_is_a_503_and_it_serves_again_when_back(
    http, postgres, wait_for
):
    assert submit(http, "before").status_code == 201
    postgres.stop()

    assert http.get("/healthz").status_code == 200  # the process itself is fine
    ready = http.get("/readyz")
    assert ready.status_code == 503 and ready.json()["code"] == "database_unreachable"
    assert_database_unavailable(submit(http, "refused"))
    assert_database_unavailable(http.get("/v1/jobs"))
    # The agent's side too: a 503 is what its retry loops wait out (a 4xx would drop a batch).
    assert_database_unavailable(
        http.post("/v1/agent/claim", json={"agent_id": "a", "capacity": {"cpus": 1, "gpus": 0}})
    )

    postgres.start()
    wait_for(lambda: http.get("/readyz").status_code == 200, 60, what="/readyz after the start")
    response = submit(http, "after")
    if response.status_code != 201:
        assert_database_unavailable(response)
        response = submit(http, "after")
    assert response.status_code == 201, response.text
    # The refused submit stored nothing; everything acknowledged is there.
    assert job_names(http) == ["after", "before"]
