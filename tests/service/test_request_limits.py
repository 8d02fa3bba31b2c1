"""What the API refuses before storing it: numbers no column holds, text PostgreSQL cannot
store, configs nested too deep, bodies over the size limit and ingest batches over the batch limit
(422, 400 or 413 with a code, never a 500)."""

from __future__ import annotations

import pytest
from service_support import ADMIN, CONFIG, TestClient, bearer, claim, make_settings, submit

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
