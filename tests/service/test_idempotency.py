"""Idempotency-Key over real HTTP, on SQLite and PostgreSQL: a replay gets the first job, a
different body under the same key is a 409, and keys expire."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pytest
from service_support import ADMIN, CONFIG, LiveServer, make_settings
from sqlalchemy import update

from service.db.engine import run_in_transaction
from service.db.models import Job


def submit(url: str, key: str, **body) -> httpx.Response:
    body.setdefault("config", CONFIG)
    return httpx.post(f"{url}/v1/jobs", json=body, headers={**ADMIN, "Idempotency-Key": key})


@pytest.mark.parametrize(
    "changed",
    [
        {"config": {**CONFIG, "seed": 7}},  # another config: the reproduction
        {"priority": 5},
        {"name": "other"},
        {"tags": ["x"]},
        {"max_attempts": 1},
    ],
)
def test_same_key_with_a_different_body_is_409(live_server, changed):
    url = live_server.url
    first = submit(url, "k1", name="first")
    assert first.status_code == 201
    replay = submit(url, "k1", name="first")
    assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]
    r = submit(url, "k1", **{"name": "first", **changed})
    assert r.status_code == 409, r.text
    assert r.json()["code"] == "idempotency_key_reused"
    assert str(first.json()["id"]) in r.json()["detail"]
    # Nothing new was queued, and the first job is unchanged.
    items = httpx.get(f"{url}/v1/jobs", headers=ADMIN).json()["items"]
    assert [j["id"] for j in items] == [first.json()["id"]]
    assert items[0]["config"]["seed"] == 0 and items[0]["name"] == "first"


def test_defaults_spelled_out_are_the_same_body(live_server):
    url = live_server.url
    first = submit(url, "k2", tags=["b", "a"])
    spelled = submit(url, "k2", tags=["a", "b", "a"], priority=0, max_attempts=3, name=None,
                     config={**CONFIG, "seed": 0, "precision": "fp32"})  # fmt: skip
    assert spelled.status_code == 200 and spelled.json()["id"] == first.json()["id"]


def _submitted_long_ago(server: LiveServer, job_id: int) -> None:
    """As if the key's ttl had passed since the job was submitted (no waiting for it)."""
    long_ago = datetime(2000, 1, 1, tzinfo=UTC)
    run_in_transaction(
        server.app.state.xsam.writer,
        lambda s: s.execute(update(Job).where(Job.id == job_id).values(created_at=long_ago)),
    )


def test_keys_expire(db_url, tmp_path):
    # A ttl far longer than the test: a key expires only when its job is made old by hand.
    settings = make_settings(db_url, tmp_path, idempotency_key_ttl_s=3600)
    with LiveServer(settings) as server:
        url = server.url
        first = submit(url, "k3")
        assert submit(url, "k3").status_code == 200
        _submitted_long_ago(server, first.json()["id"])
        # After the ttl the key names a new job, with the same body or another one.
        again = submit(url, "k3")
        assert again.status_code == 201 and again.json()["id"] != first.json()["id"]
        assert submit(url, "k3").json()["id"] == again.json()["id"]
        other = submit(url, "k3", priority=9)
        assert other.status_code == 409
        _submitted_long_ago(server, again.json()["id"])
        assert submit(url, "k3", priority=9).status_code == 201
        assert len(httpx.get(f"{url}/v1/jobs", headers=ADMIN).json()["items"]) == 3


def test_the_default_ttl_is_a_day():
    from service.settings import Settings

    assert Settings(_env_file=None).idempotency_key_ttl_s == 24 * 3600
