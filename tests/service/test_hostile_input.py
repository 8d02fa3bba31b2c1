"""Hostile request bodies over real HTTP (a uvicorn server), on SQLite and PostgreSQL.

Python's JSON parser accepts lone UTF-16 surrogates and NaN/Infinity; neither can be stored and
served back as JSON. Wherever they appear in a body they are a 422 that names the field, nothing
is stored, and the owner's, the admin's and the agents' reads keep working.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from fastapi.exceptions import RequestValidationError
from service_support import ADMIN, CONFIG

from service.app import _validation_error

BAD_TEXT = "x\ud800"  # a lone high surrogate
NAN, INF = float("nan"), float("inf")


def send(url: str, path: str, body: Any, headers: dict[str, str]) -> httpx.Response:
    # json.dumps writes "\ud800" as that escape and NaN as NaN, exactly as a careless client.
    content = json.dumps(body, allow_nan=True)
    return httpx.post(
        url + path, content=content, headers={**headers, "Content-Type": "application/json"}
    )


def token(url: str, name: str, role: str = "user") -> dict[str, str]:
    r = httpx.post(f"{url}/v1/tokens", json={"name": name, "role": role}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def with_config(**parts: Any) -> dict[str, Any]:
    return {"config": {**CONFIG, **parts}}


OPTS = ["body", "config", "model", "options"]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        # the reproduction of the issue: a surrogate in model options
        (with_config(model={"name": "mlp", "options": {"k": BAD_TEXT}}), [*OPTS, "k"]),
        # nested in data options, and as an object key
        (with_config(data={"name": "digits", "options": {"a": [1, BAD_TEXT]}}),
         ["body", "config", "data", "options", "a", 1]),
        (with_config(model={"name": "mlp", "options": {BAD_TEXT: 1}}), [*OPTS, "x\\ud800"]),
        # plain string fields of the request and of the config
        ({**with_config(), "name": BAD_TEXT}, ["body", "name"]),
        ({**with_config(), "tags": ["ok", BAD_TEXT]}, ["body", "tags", 1]),
        (with_config(data={"name": "digits", "root": BAD_TEXT}),
         ["body", "config", "data", "root"]),
        # non-finite numbers, which pydantic would have stored as null
        (with_config(model={"name": "mlp", "options": {"w": NAN}}), [*OPTS, "w"]),
        (with_config(data={"name": "synthetic", "options": {"shape": [INF]}}),
         ["body", "config", "data", "options", "shape", 0]),
        (with_config(optimizer={"lr": -INF}), ["body", "config", "optimizer", "lr"]),
    ],
)  # fmt: skip
def test_unstorable_submit_is_422_naming_the_field(live_server, body, loc):
    url = live_server.url
    alice = token(url, "alice")
    agent = token(url, "agent-1", "agent")
    r = send(url, "/v1/jobs", body, alice)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "validation_error"
    assert r.json()["detail"][0]["loc"] == loc
    # Nothing was stored, and every read of the queue still works.
    for headers in (alice, ADMIN):
        listed = httpx.get(f"{url}/v1/jobs", headers=headers)
        assert listed.status_code == 200 and listed.json()["items"] == []
    claim = {"agent_id": "a1", "capacity": {"cpus": 4, "gpus": 0}}
    assert httpx.post(f"{url}/v1/agent/claim", json=claim, headers=agent).status_code == 204


@pytest.mark.parametrize(
    ("path", "body", "loc"),
    [
        ("events", {"events": [{"type": "log", "data": {"loss": NAN}}]},
         ["body", "events", 0, "data", "loss"]),  # was a 500 on PostgreSQL
        ("events", {"events": [{"type": "log", "data": {"v": [INF]}}]},
         ["body", "events", 0, "data", "v", 0]),
        ("events", {"events": [{"type": "log", "message": BAD_TEXT}]},
         ["body", "events", 0, "message"]),
        ("events", {"events": [{"type": "log", "data": {BAD_TEXT: 1}}]},
         ["body", "events", 0, "data", "x\\ud800"]),
        ("metrics", {"points": [{"name": BAD_TEXT, "step": 1, "value": 1}]},
         ["body", "points", 0, "name"]),
        ("finish", {"status": "failed", "error": {"type": "x", "message": BAD_TEXT}},
         ["body", "error", "message"]),
        ("release", {"reason": BAD_TEXT}, ["body", "reason"]),
    ],
)  # fmt: skip
def test_unstorable_agent_reports_are_422_naming_the_field(live_server, path, body, loc):
    url = live_server.url
    alice = token(url, "alice")
    agent = token(url, "agent-1", "agent")
    job = send(url, "/v1/jobs", with_config(), alice).json()
    claim = {"agent_id": "a1", "capacity": {"cpus": 4, "gpus": 0}}
    lease = httpx.post(f"{url}/v1/agent/claim", json=claim, headers=agent).json()["lease"]
    r = send(
        url,
        f"/v1/agent/jobs/{job['id']}/{path}",
        {"lease_token": lease["lease_token"], **body},
        agent,
    )
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == loc
    # The job is untouched and readable, its events included.
    got = httpx.get(f"{url}/v1/jobs/{job['id']}", headers=alice)
    assert got.status_code == 200 and got.json()["status"] == "running"
    assert httpx.get(f"{url}/v1/jobs/{job['id']}/events", headers=alice).status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "loc"),
    [
        ("/v1/agent/claim", {"agent_id": BAD_TEXT, "capacity": {"cpus": 1, "gpus": 0}},
         ["body", "agent_id"]),
        ("/v1/agent/claim", {"agent_id": "a", "capacity": {"cpus": INF, "gpus": 0}},
         ["body", "capacity", "cpus"]),
        ("/v1/tokens", {"name": BAD_TEXT, "role": "user"}, ["body", "name"]),
    ],
)  # fmt: skip
def test_unstorable_agent_and_token_requests_are_422(live_server, path, body, loc):
    r = send(live_server.url, path, body, ADMIN)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == loc


def test_a_body_without_content_type_is_checked_too(live_server):
    # FastAPI parses a body that names no content type as JSON: it must be checked the same.
    url = live_server.url
    content = json.dumps(with_config(model={"name": "mlp", "options": {"k": BAD_TEXT}}))
    r = httpx.post(f"{url}/v1/jobs", content=content.encode(), headers=ADMIN)
    assert r.status_code == 422, r.text
    assert httpx.get(f"{url}/v1/jobs", headers=ADMIN).json()["items"] == []


def test_the_validation_error_handler_cannot_fail_itself():
    # A 422 that echoes a surrogate (in its input, loc or message) or an unencodable object.
    echo = RequestValidationError(
        [{"type": "x", "loc": ("body", "\udfff"), "msg": "bad \ud800", "input": {"\ud800": NAN}}]
    )
    r = asyncio.run(_validation_error(None, echo))  # type: ignore[arg-type]
    assert r.status_code == 422
    detail = json.loads(r.body)["detail"][0]
    assert detail["loc"] == ["body", "\\udfff"] and detail["input"] == {"\\ud800": "nan"}

    class Weird:
        def __iter__(self):
            raise RuntimeError("cannot be encoded")

    odd = RequestValidationError([{"type": "x", "loc": ("body",), "msg": "m", "input": Weird()}])
    r = asyncio.run(_validation_error(None, odd))  # type: ignore[arg-type]
    assert r.status_code == 422 and json.loads(r.body)["code"] == "validation_error"


# --- numbers that reach a column or the database's arithmetic ---------------------------------


@pytest.mark.parametrize(
    ("capacity", "loc"),
    [
        ({"cpus": 4, "gpus": 2**31}, ["body", "capacity", "gpus"]),  # was a 500 on PostgreSQL
        ({"cpus": 4, "gpus": 2**63}, ["body", "capacity", "gpus"]),
        ({"cpus": 1e300, "gpus": 0}, ["body", "capacity", "cpus"]),
    ],
)
def test_claim_capacity_beyond_its_column_is_422(live_server, capacity, loc):
    url = live_server.url
    send(url, "/v1/jobs", with_config(), ADMIN)
    r = send(url, "/v1/agent/claim", {"agent_id": "a1", "capacity": capacity}, ADMIN)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == loc
    # Nothing was claimed: the job is still queued, attempt 0.
    job = httpx.get(f"{url}/v1/jobs", headers=ADMIN).json()["items"][0]
    assert job["status"] == "queued" and job["attempt"] == 0


@pytest.mark.parametrize(
    ("optimizer", "field"),
    [
        ({"alpha_delta": 5e-324}, "alpha_delta"),  # alpha_max/alpha_delta overflows to inf
        ({"alpha_max": 1e308, "alpha_delta": 1e-308}, "alpha_max"),
        ({"rho": 1e308}, "rho"),  # 2·rho would overflow
    ],
)
def test_overflowing_config_is_422_naming_the_field(live_server, optimizer, field):
    r = send(live_server.url, "/v1/jobs", with_config(optimizer=optimizer), ADMIN)
    assert r.status_code == 422, r.text
    locs = [e["loc"] for e in r.json()["detail"]]
    assert ["body", "config", "optimizer", field] in locs, locs


def test_downsampling_a_series_spanning_every_step_does_not_overflow(live_server):
    # Steps 0 … 2**63-1: (step - lo) * max_points overflowed BIGINT on PostgreSQL (500) and
    # became a float on SQLite (max_points=1 gave 4 buckets).
    url = live_server.url
    job = send(url, "/v1/jobs", with_config(), ADMIN).json()
    claim = {"agent_id": "a1", "capacity": {"cpus": 4, "gpus": 0}}
    lease = httpx.post(f"{url}/v1/agent/claim", json=claim, headers=ADMIN).json()["lease"]
    steps = [0, 1, 2, 2**31, 2**62, 2**63 - 2, 2**63 - 1]
    points = [{"name": "loss", "step": s, "value": float(i)} for i, s in enumerate(steps)]
    body = {"lease_token": lease["lease_token"], "points": points}
    r = send(url, f"/v1/agent/jobs/{job['id']}/metrics", body, ADMIN)
    assert r.status_code == 200, r.text
    for max_points in (1, 2, 3, 6):
        r = httpx.get(
            f"{url}/v1/jobs/{job['id']}/metrics", params={"max_points": max_points}, headers=ADMIN
        )
        assert r.status_code == 200, r.text
        buckets = r.json()["series"]["loss"]
        assert 1 <= len(buckets) <= max_points
        assert sum(b["count"] for b in buckets) == len(steps)
        assert buckets[0]["step_min"] == 0 and buckets[-1]["step"] == 2**63 - 1
    one = httpx.get(f"{url}/v1/jobs/{job['id']}/metrics?max_points=1", headers=ADMIN).json()
    (bucket,) = one["series"]["loss"]
    assert bucket["min"] == 0.0 and bucket["max"] == 6.0 and bucket["value"] == 6.0


# --- resource bombs: refused at submit, with the reason, not retried for hours at run time ---


@pytest.mark.parametrize(
    ("config", "loc", "reason"),
    [
        (with_config(data={"name": "synthetic", "options": {"num_train": 10**30}}),
         ["body", "config", "data", "options"], "num_train"),
        (with_config(data={"name": "synthetic",
                           "options": {"shape": [3, 65536, 65536], "num_train": 10}}),
         ["body", "config", "data", "options"], "GiB of samples"),
        (with_config(data={"name": "digits", "batch_size": 10**30}),
         ["body", "config", "data", "batch_size"], "must be <="),
        (with_config(data={"name": "digits", "num_train": 10**30}),
         ["body", "config", "data", "num_train"], "must be <="),
        (with_config(model={"name": "mlp", "options": {"hidden": [65536] * 100}}),
         ["body", "config", "model", "options"], "hidden"),
        (with_config(model={"name": "mlp", "options": {"widht": 3}}),
         ["body", "config", "model", "options"], "not an option"),
    ],
)  # fmt: skip
def test_resource_bombs_are_refused_at_submit(live_server, config, loc, reason):
    r = send(live_server.url, "/v1/jobs", config, ADMIN)
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert any(e["loc"] == loc and reason in e["msg"] for e in errors), errors
    assert httpx.get(f"{live_server.url}/v1/jobs", headers=ADMIN).json()["items"] == []
