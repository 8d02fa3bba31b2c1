"""/v1/jobs and /v1/tokens: submit, validation, idempotency, pagination, isolation, auth."""

from __future__ import annotations

import pytest
from service_support import ADMIN, CONFIG, TestClient, bearer, claim, make_settings, submit


def test_submit_returns_the_job(client, alice):
    r = client.post(
        "/v1/jobs",
        json={"name": "mlp-digits", "config": CONFIG, "priority": 3, "tags": ["sweep", "a"]},
        headers=alice,
    )
    assert r.status_code == 201
    job = r.json()
    assert isinstance(job["id"], int)
    assert job["owner"] == "alice" and job["status"] == "queued" and job["attempt"] == 0
    assert job["config"]["optimizer"]["rho"] == 0.15  # defaults are filled in
    assert job["tags"] == ["a", "sweep"] and job["priority"] == 3 and job["max_attempts"] == 3
    assert job["queue_position"] == 1 and job["progress"] is None and job["error"] is None
    expected = {
        "id", "name", "owner", "status", "config", "priority", "attempt", "max_attempts", "tags",
        "created_at", "started_at", "finished_at", "progress", "latest_metrics", "error",
        "queue_position",
    }  # fmt: skip
    assert expected <= set(job)


@pytest.mark.parametrize(
    ("config_patch", "loc"),
    [
        # a field validator: the offending field is the last element of loc
        ({"optimizer": {"rho": -1}}, ["body", "config", "optimizer", "rho"]),
        # a cross-field check names its field in its message; loc is extended with it
        ({"optimizer": {"rho": 0.5, "rho_max": 0.1}}, ["body", "config", "optimizer", "rho_max"]),
        # an unknown key is refused, not ignored
        ({"optimizer": {"rhoo": 1}}, ["body", "config", "optimizer", "rhoo"]),
        # an absolute data path is refused
        ({"data": {"name": "cifar10", "root": "/etc"}}, ["body", "config", "data", "root"]),
    ],
)
def test_invalid_config_names_the_field(client, alice, config_patch, loc):
    r = client.post("/v1/jobs", json={"config": {**CONFIG, **config_patch}}, headers=alice)
    assert r.status_code == 422
    body = r.json()
    assert body["code"] == "validation_error"
    assert loc in [e["loc"] for e in body["detail"]], body


def test_idempotency_key_returns_the_same_job(client, alice, bob):
    key = {"Idempotency-Key": "submit-42"}
    first = client.post("/v1/jobs", json={"config": CONFIG}, headers={**alice, **key})
    again = client.post("/v1/jobs", json={"config": CONFIG}, headers={**alice, **key})
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    # The key is per owner: bob's identical key makes bob's own job.
    other = client.post("/v1/jobs", json={"config": CONFIG}, headers={**bob, **key})
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]
    assert len(client.get("/v1/jobs", headers=alice).json()["items"]) == 1


def test_empty_idempotency_key_is_no_key(client, alice):
    # As the Python client does: an empty key must not make every keyless submit one job.
    empty = {**alice, "Idempotency-Key": ""}
    first = client.post("/v1/jobs", json={"config": CONFIG}, headers=empty)
    again = client.post("/v1/jobs", json={"config": CONFIG}, headers=empty)
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] != first.json()["id"]


def test_pagination_newest_first_with_filters(client, alice, agent):
    ids = [submit(client, alice, tags=["even"] if i % 2 == 0 else [])["id"] for i in range(7)]
    seen, cursor = [], None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", params=params, headers=alice).json()
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids, reverse=True)
    tagged = client.get("/v1/jobs", params={"tag": "even"}, headers=alice).json()["items"]
    assert [j["id"] for j in tagged] == [ids[6], ids[4], ids[2], ids[0]]
    claim(client, agent)  # the oldest job starts running
    running = client.get("/v1/jobs", params={"status": "running"}, headers=alice).json()
    assert [j["id"] for j in running["items"]] == [ids[0]] and running["next_cursor"] is None


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"limit": 201}, 422),  # above the page limit
        ({"limit": 0}, 422),
        ({"status": "sleeping"}, 422),  # not a status
        ({"cursor": "not-a-cursor"}, 400),
        ({"cursor": "aWQ6MTAwMDAwMDAwMDAwMDAwMDAwMDAwMDA"}, 400),  # "id:10**20", past BIGINT
        ({"tag": "a\x00b"}, 422),  # NUL: PostgreSQL cannot compare it
    ],
)
def test_list_rejects_bad_parameters(client, alice, params, status):
    r = client.get("/v1/jobs", params=params, headers=alice)
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json()["code"] == "invalid_cursor"


BIG = 10**20  # past 2**63 - 1: no column holds it


@pytest.mark.parametrize(
    ("method", "path", "loc"),
    [
        ("GET", f"/v1/jobs/{BIG}", ["path", "job_id"]),
        ("GET", "/v1/jobs/-1", ["path", "job_id"]),  # (0 is in range: a 404)
        ("POST", f"/v1/jobs/{2**63}/cancel", ["path", "job_id"]),
        ("GET", f"/v1/jobs/{BIG}/metrics", ["path", "job_id"]),
        ("GET", f"/v1/jobs/1/metrics?since_step={BIG}", ["query", "since_step"]),
        ("GET", f"/v1/jobs/1/metrics?until_step={2**63}", ["query", "until_step"]),
        ("GET", f"/v1/jobs/1/events?after={BIG}", ["query", "after"]),
        ("GET", "/v1/jobs/1/metrics?names=a%00b", ["query", "names"]),  # NUL
        ("POST", f"/v1/agent/jobs/{BIG}/heartbeat", ["path", "job_id"]),
        ("DELETE", f"/v1/tokens/{BIG}", ["path", "token_id"]),
    ],
)
def test_unstorable_parameters_are_422_not_500(client, method, path, loc):
    body = {"lease_token": "x"} if "heartbeat" in path else None
    r = client.request(method, path, headers=ADMIN, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == loc


def test_in_range_id_of_no_job_is_404(client, alice):
    for job_id in (0, 2**63 - 1):
        r = client.get(f"/v1/jobs/{job_id}", headers=alice)
        assert r.status_code == 404 and r.json()["code"] == "job_not_found"


def test_unstorable_bodies_are_422_not_500(client, alice):
    r = client.post("/v1/jobs", json={"config": CONFIG, "name": "a\x00b"}, headers=alice)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "validation_error"
    assert client.get("/v1/jobs", headers=alice).json()["items"] == []
    deep: dict = {"a": []}
    for _ in range(300):  # deeper than a config is ever nested; too deep to serialise
        deep = {"a": [deep]}
    config = {**CONFIG, "model": {"name": "mlp", "options": deep}}
    r = client.post("/v1/jobs", json={"config": config}, headers=alice)
    assert r.status_code == 422, r.text
    assert "nest deeper" in r.json()["detail"][0]["msg"]
    # Deeper than the JSON parser goes: a 400 with a code.
    r = client.post(
        "/v1/jobs",
        content='{"config": ' + "[" * 5000 + "]" * 5000 + "}",
        headers={**alice, "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["code"] == "bad_request"


def test_owners_see_only_their_jobs(client, alice, bob):
    job = submit(client, alice)
    for method, path in [
        ("GET", f"/v1/jobs/{job['id']}"),
        ("POST", f"/v1/jobs/{job['id']}/cancel"),
        ("GET", f"/v1/jobs/{job['id']}/metrics"),
        ("GET", f"/v1/jobs/{job['id']}/metrics/latest"),
        ("GET", f"/v1/jobs/{job['id']}/events"),
        ("GET", f"/v1/jobs/{job['id']}/artifacts/model"),
    ]:
        r = client.request(method, path, headers=bob)
        assert r.status_code == 404, (method, path)
        assert r.json() == {"detail": f"job {job['id']} not found", "code": "job_not_found"}
    assert client.get("/v1/jobs", headers=bob).json()["items"] == []
    # The job is untouched, and the admin sees everyone's jobs.
    assert client.get(f"/v1/jobs/{job['id']}", headers=ADMIN).json()["status"] == "queued"
    assert [j["owner"] for j in client.get("/v1/jobs", headers=ADMIN).json()["items"]] == ["alice"]


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


def test_body_limit_is_413(db_url, tmp_path):

    from service.app import create_app

    app = create_app(make_settings(db_url, tmp_path, max_body_bytes=2000))
    with TestClient(app) as client:
        alice = bearer(
            client.post("/v1/tokens", json={"name": "alice"}, headers=ADMIN).json()["token"]
        )
        big = {"config": CONFIG, "name": "x" * 190, "tags": ["t" * 60] * 30}
        r = client.post("/v1/jobs", json=big, headers=alice)
        assert r.status_code == 413
        assert r.json()["code"] == "payload_too_large"

        # A streamed body without Content-Length is counted as it arrives.
        def chunks():
            yield b'{"config": {"model": {"name": "mlp"}}, "name": "'
            for _ in range(100):
                yield b"y" * 100
            yield b'"}'

        r = client.post(
            "/v1/jobs", content=chunks(), headers={**alice, "Content-Type": "application/json"}
        )
        assert r.status_code == 413
        assert client.get("/v1/jobs", headers=alice).json()["items"] == []


def test_ingest_batch_limit(client, alice, agent):
    job = submit(client, alice)
    lease = claim(client, agent)["lease"]
    points = [{"name": "loss", "step": i, "value": 1.0} for i in range(5001)]
    r = client.post(
        f"/v1/agent/jobs/{job['id']}/metrics",
        json={"lease_token": lease["lease_token"], "points": points},
        headers=agent,
    )
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"


def test_artifact_download(client, settings, alice, agent):
    job = submit(client, alice)
    url = f"/v1/jobs/{job['id']}/artifacts/model"
    r = client.get(url, headers=alice)
    assert r.status_code == 404 and "queued" in r.json()["detail"]
    lease = claim(client, agent)["lease"]
    client.post(
        f"/v1/agent/jobs/{job['id']}/finish",
        json={"lease_token": lease["lease_token"], "status": "succeeded"},
        headers=agent,
    )
    r = client.get(url, headers=alice)
    assert r.status_code == 404 and "missing" in r.json()["detail"]
    weights = settings.artifacts_path / f"job-{job['id']}" / "model.pt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"\x80\x02weights")
    r = client.get(url, headers=alice)
    assert r.status_code == 200 and r.content == b"\x80\x02weights"
    assert r.headers["content-type"] == "application/octet-stream"


def test_health_ready_and_prometheus(client, alice):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    submit(client, alice)
    submit(client, alice)
    text = client.get("/metrics").text
    assert 'xsam_jobs{status="queued"} 2.0' in text
    assert "xsam_queue_depth 2.0" in text
    assert (
        'xsam_http_request_duration_seconds_count{method="POST",route="/v1/jobs",status="201"} 2.0'
        in text
    )


def test_readyz_is_503_without_a_database(tmp_path):

    from service.app import create_app

    url = "postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=1"
    with TestClient(create_app(make_settings(url, tmp_path))) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["code"] == "database_unreachable"
        assert client.get("/healthz").status_code == 200


def test_unknown_route_has_a_code(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["code"] == "not_found"
