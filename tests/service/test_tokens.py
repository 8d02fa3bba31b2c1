"""Bearer tokens: what each role may call, /v1/tokens (create, list, revoke at once), and the
agent token given in the settings."""

from __future__ import annotations

import pytest
from service_support import ADMIN, TestClient, bearer, claim, make_settings, submit


@pytest.mark.parametrize(
    ("who", "method", "path", "status"),
    [
        (None, "GET", "/v1/jobs", 401),  # no token
        ("bogus", "GET", "/v1/jobs", 401),  # unknown token
        ("alice", "POST", "/v1/agent/claim", 403),  # users may not claim
        ("alice", "POST", "/v1/agent/jobs/1/heartbeat", 403),
        ("alice", "POST", "/v1/tokens", 403),  # only admins manage tokens
        ("agent", "GET", "/v1/tokens", 403),
    ],
)
def test_roles(client, alice, agent, who, method, path, status):
    headers = {"alice": alice, "agent": agent, "bogus": bearer("xsam_nope"), None: {}}[who]
    body = {"agent_id": "x", "capacity": {"cpus": 1, "gpus": 0}} if "claim" in path else {}
    r = client.request(method, path, headers=headers, json=body)
    assert r.status_code == status
    assert r.json()["code"] == {401: "unauthorized", 403: "forbidden"}[status]


def test_tokens_create_list_revoke(client):
    r = client.post("/v1/tokens", json={"name": "carol", "role": "user"}, headers=ADMIN)
    assert r.status_code == 201
    created = r.json()
    assert set(created) == {"id", "name", "role", "token"}
    carol = bearer(created["token"])
    assert client.get("/v1/jobs", headers=carol).status_code == 200
    page = client.get("/v1/tokens", headers=ADMIN).json()
    assert set(page) == {"items", "next_cursor"} and page["next_cursor"] is None  # list shape
    listed = page["items"]
    assert [(t["name"], t["role"], t["revoked_at"]) for t in listed] == [("carol", "user", None)]
    assert "token" not in listed[0] and "token_hash" not in listed[0]
    assert client.delete(f"/v1/tokens/{created['id']}", headers=ADMIN).status_code == 204
    assert client.get("/v1/jobs", headers=carol).status_code == 401  # at once
    assert client.delete("/v1/tokens/9999", headers=ADMIN).status_code == 404
    r = client.post("/v1/tokens", json={"name": "x", "role": "root"}, headers=ADMIN)
    assert r.status_code == 422


def test_agent_token_from_settings_is_an_agent(db_url, tmp_path):

    from service.app import create_app

    app = create_app(make_settings(db_url, tmp_path, agent_token="env-agent-secret"))
    with TestClient(app) as client:
        env_agent = bearer("env-agent-secret")
        job = submit(client, ADMIN)
        claimed = claim(client, env_agent)
        assert claimed is not None and claimed["job"]["id"] == job["id"]
        assert client.get("/v1/tokens", headers=env_agent).status_code == 403  # not an admin
        assert client.get("/v1/jobs", headers=bearer("env-agent-secretX")).status_code == 401
    # Without the setting the same secret is nobody.
    with TestClient(create_app(make_settings(db_url, tmp_path))) as client:
        assert client.get("/v1/jobs", headers=bearer("env-agent-secret")).status_code == 401


def test_overlapping_lookups_of_one_token_share_one_query():
    """When a cached token expires under load, the requests in flight with it wait for one
    lookup instead of each running its own; an unknown token is looked up again next time."""
    import asyncio

    from service.auth import Principal, Role, TokenCache

    calls = {"known": 0, "unknown": 0}

    def look_up(which: str, principal: Principal | None):
        async def run() -> Principal | None:
            calls[which] += 1
            await asyncio.sleep(0.01)
            return principal

        return run

    alice = Principal(name="alice", role=Role.USER, token_id=1)

    async def main() -> None:
        cache = TokenCache()
        got = await asyncio.gather(
            *[cache.look_up_once("k", look_up("known", alice)) for _ in range(20)]
        )
        assert got == [alice] * 20 and cache.get("k") == alice
        for _ in range(2):
            assert await cache.look_up_once("u", look_up("unknown", None)) is None
        assert cache.get("u") is None

    asyncio.run(main())
    assert calls == {"known": 1, "unknown": 2}
