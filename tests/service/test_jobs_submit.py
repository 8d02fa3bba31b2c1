"""POST /v1/jobs: the job it returns, config errors that name their field, and the
Idempotency-Key (the same key and owner give the same job)."""

from __future__ import annotations

import pytest
from service_support import CONFIG


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
