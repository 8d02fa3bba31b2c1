"""Ownership over real HTTP, on SQLite and PostgreSQL: jobs belong to the token that submitted
them, not to a name; the service's own names are reserved; a name is held by one token."""

from __future__ import annotations

import httpx
import pytest
from service_support import ADMIN, CONFIG


def token(url: str, name: str, role: str = "user") -> httpx.Response:
    return httpx.post(f"{url}/v1/tokens", json={"name": name, "role": role}, headers=ADMIN)


def bearer(r: httpx.Response) -> dict[str, str]:
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


@pytest.mark.parametrize("name", ["admin", "agent", "Admin"])
def test_the_services_own_names_are_reserved(live_server, name):
    url = live_server.url
    job = httpx.post(f"{url}/v1/jobs", json={"config": CONFIG}, headers=ADMIN).json()
    r = token(url, name)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "name"]
    assert "reserved" in r.json()["detail"][0]["msg"]
    # (the admin's job stays the admin's)
    assert httpx.get(f"{url}/v1/jobs/{job['id']}", headers=ADMIN).status_code == 200


def test_an_active_name_cannot_be_given_twice(live_server):
    url = live_server.url
    first = token(url, "alice")
    again = token(url, "alice")
    assert again.status_code == 409 and again.json()["code"] == "token_name_taken"
    # Revoked, the name may be given again, but jobs stay with the token that submitted them.
    alice = bearer(first)
    job = httpx.post(f"{url}/v1/jobs", json={"config": CONFIG}, headers=alice).json()
    assert httpx.delete(f"{url}/v1/tokens/{first.json()['id']}", headers=ADMIN).status_code == 204
    new_alice = bearer(token(url, "alice"))
    assert httpx.get(f"{url}/v1/jobs/{job['id']}", headers=new_alice).status_code == 404
    assert httpx.get(f"{url}/v1/jobs", headers=new_alice).json()["items"] == []
    mine = httpx.post(f"{url}/v1/jobs", json={"config": CONFIG}, headers=new_alice).json()
    assert mine["owner"] == "alice"
    listed = httpx.get(f"{url}/v1/jobs", headers=ADMIN).json()["items"]
    assert {j["id"] for j in listed} == {job["id"], mine["id"]}


def test_same_named_tokens_from_an_old_database_do_not_share_jobs(live_server, settings):
    # Two same-named tokens, as an older server allowed: each sees only its own jobs, and the
    # same Idempotency-Key gives each its own job.
    from sqlalchemy import create_engine, update

    from service.db.models import Token

    url = live_server.url
    first, second = bearer(token(url, "carol")), bearer(token(url, "carol-2"))
    engine = create_engine(settings.url)
    with engine.begin() as conn:
        conn.execute(update(Token).where(Token.name == "carol-2").values(name="carol"))
    engine.dispose()
    key = {"Idempotency-Key": "k"}
    a = httpx.post(f"{url}/v1/jobs", json={"config": CONFIG}, headers={**first, **key})
    b = httpx.post(f"{url}/v1/jobs", json={"config": CONFIG}, headers={**second, **key})
    assert a.status_code == b.status_code == 201 and a.json()["id"] != b.json()["id"]
    assert a.json()["owner"] == b.json()["owner"] == "carol"
    for headers, own, other in ((first, a, b), (second, b, a)):
        ids = [j["id"] for j in httpx.get(f"{url}/v1/jobs", headers=headers).json()["items"]]
        assert ids == [own.json()["id"]]
        theirs = other.json()["id"]
        assert httpx.get(f"{url}/v1/jobs/{theirs}", headers=headers).status_code == 404
        assert httpx.post(f"{url}/v1/jobs/{theirs}/cancel", headers=headers).status_code == 404


def test_a_user_token_named_admin_in_an_old_database_sees_no_admin_job(live_server, settings):
    from sqlalchemy import create_engine, update

    from service.db.models import Token

    url = live_server.url
    admins_job = httpx.post(f"{url}/v1/jobs", json={"config": CONFIG}, headers=ADMIN).json()
    created = token(url, "mallory")
    mallory = bearer(created)
    engine = create_engine(settings.url)
    with engine.begin() as conn:  # named "admin" before names were reserved
        conn.execute(update(Token).where(Token.id == created.json()["id"]).values(name="admin"))
    engine.dispose()
    assert httpx.get(f"{url}/v1/jobs", headers=mallory).json()["items"] == []
    for method, path in (("GET", ""), ("POST", "/cancel"), ("GET", "/events")):
        r = httpx.request(method, f"{url}/v1/jobs/{admins_job['id']}{path}", headers=mallory)
        assert r.status_code == 404, (method, path)
    assert httpx.get(f"{url}/v1/jobs/{admins_job['id']}", headers=ADMIN).json()["status"] == (
        "queued"
    )


def test_the_migration_gives_existing_jobs_their_owners_token(db_url):
    # db_url is migrated to head: go back to before this migration, write rows as the old code
    # did, come back.
    from sqlalchemy import create_engine, text

    from service.db.migrate import downgrade, upgrade

    downgrade(db_url, "0002_studies")
    engine = create_engine(db_url)
    now = "2026-11-28 00:00:00"
    with engine.begin() as conn:
        for tid, name in [(1, "admin"), (2, "alice"), (3, "dup"), (4, "dup")]:
            conn.execute(
                text("INSERT INTO tokens (id, name, role, token_hash, created_at) "
                     "VALUES (:i, :n, 'user', :h, :t)"),
                {"i": tid, "n": name, "h": f"h{tid}", "t": now},
            )  # fmt: skip
        for jid, owner in [(1, "admin"), (2, "alice"), (3, "dup"), (4, "agent"), (5, "gone")]:
            conn.execute(
                text("INSERT INTO jobs (id, owner, status, config, priority, cpus, gpus, attempt,"
                     " max_attempts, created_at, cancel_requested, idempotency_key) VALUES (:i, :o,"
                     " 'queued', '{}', 0, 1, 0, 0, 3, :t, false, 'k')"),
                {"i": jid, "o": owner, "t": now},
            )  # fmt: skip
    upgrade(db_url)
    with engine.connect() as conn:
        keys = dict(conn.execute(text("SELECT id, owner_key FROM jobs ORDER BY id")).all())
    engine.dispose()
    assert keys == {
        1: "token:1",  # the one token named admin (the provisioned one)
        2: "token:2",
        3: "legacy:dup",  # two tokens share the name: only admins may see it
        4: "env:agent",  # no token row: XSAM_AGENT_TOKEN
        5: "legacy:gone",
    }
