"""Quotas over real HTTP, on SQLite and PostgreSQL: queued jobs per user, a priority cap for
users, a per-token submit rate (429 + Retry-After) and a size cap on free-form options."""

from __future__ import annotations

import httpx
import pytest
from service_support import ADMIN, CONFIG, LiveServer, make_settings

from service.settings import Settings


def user(url: str, name: str = "alice") -> dict[str, str]:
    r = httpx.post(f"{url}/v1/tokens", json={"name": name}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def submit(url: str, headers: dict[str, str], **body) -> httpx.Response:
    body.setdefault("config", CONFIG)
    return httpx.post(f"{url}/v1/jobs", json=body, headers=headers)


@pytest.fixture
def server(db_url, tmp_path, request):
    overrides = getattr(request, "param", {})
    with LiveServer(make_settings(db_url, tmp_path, **overrides)) as live:
        yield live.url


def test_the_defaults_are_a_small_labs():
    s = Settings(_env_file=None)
    assert s.max_queued_jobs_per_user == 200 and s.max_user_priority == 10
    assert s.submit_rate_per_minute == 60 and s.max_options_bytes == 64 * 1024


@pytest.mark.parametrize("server", [{"max_queued_jobs_per_user": 2}], indirect=True)
def test_queued_jobs_per_user(server):
    alice, bob = user(server), user(server, "bob")
    first = submit(server, alice, name="1")
    assert submit(server, alice, name="2").status_code == 201
    r = submit(server, alice, name="3")
    assert r.status_code == 429 and r.json()["code"] == "quota_exceeded", r.text
    # Per user, and admins are exempt.
    assert submit(server, bob).status_code == 201
    assert submit(server, ADMIN).status_code == submit(server, ADMIN).status_code == 201
    # Cancelling one frees a place.
    cancel = httpx.post(f"{server}/v1/jobs/{first.json()['id']}/cancel", headers=alice)
    assert cancel.status_code == 200
    assert submit(server, alice, name="4").status_code == 201


def test_users_priority_is_capped(server):
    alice = user(server)
    assert submit(server, alice, priority=10).status_code == 201
    r = submit(server, alice, priority=1000)
    assert r.status_code == 403 and r.json()["code"] == "priority_not_allowed", r.text
    assert submit(server, ADMIN, priority=1000).status_code == 201


@pytest.mark.parametrize("server", [{"submit_rate_per_minute": 3}], indirect=True)
def test_submit_rate_per_token(server):
    alice, bob = user(server), user(server, "bob")
    assert [submit(server, alice).status_code for _ in range(3)] == [201, 201, 201]
    r = submit(server, alice)
    assert r.status_code == 429 and r.json()["code"] == "rate_limited", r.text
    assert 1 <= int(r.headers["Retry-After"]) <= 20
    assert submit(server, bob).status_code == 201  # another token has its own allowance
    listed = httpx.get(f"{server}/v1/jobs", headers=alice).json()["items"]
    assert len(listed) == 3


@pytest.mark.parametrize("server", [{"max_options_bytes": 32}], indirect=True)
def test_options_are_size_capped(server):
    # (Declared options are bounded one by one too; the cap bounds what they add up to.)
    alice = user(server)
    big = {"name": "mlp", "options": {"hidden": [4096] * 8}}
    r = submit(server, alice, config={**CONFIG, "model": big})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "config", "model", "options"]
    assert "bytes" in r.json()["detail"][0]["msg"]
    assert httpx.get(f"{server}/v1/jobs", headers=ADMIN).json()["items"] == []


def gpu_job(url: str, headers: dict[str, str], gpus: int) -> dict:
    resources = {"num_workers": gpus, "use_gpu": True}
    data = {"name": "digits", "batch_size": 120}  # divisible by every rank count used here
    r = submit(url, headers, config={**CONFIG, "data": data, "resources": resources})
    assert r.status_code == 201, r.text
    return r.json()


def claim(url: str, gpus: int) -> dict | None:
    body = {"agent_id": "a1", "capacity": {"cpus": 64, "gpus": gpus}}
    r = httpx.post(f"{url}/v1/agent/claim", json=body, headers=ADMIN)
    assert r.status_code in (200, 204), r.text
    return r.json() if r.status_code == 200 else None


@pytest.mark.parametrize("server", [{"max_running_gpus_per_user": 2}], indirect=True)
def test_running_gpus_per_user_at_claim(server):
    alice, bob = user(server), user(server, "bob")
    a1, a2 = gpu_job(server, alice, 2), gpu_job(server, alice, 1)
    b1 = gpu_job(server, bob, 1)
    cpu = submit(server, alice).json()
    first = claim(server, 8)
    assert first["job"]["id"] == a1["id"]  # alice now runs 2 GPUs: her limit
    # Her next GPU job is passed over; bob's is claimed, and her CPU job still runs.
    assert claim(server, 8)["job"]["id"] == b1["id"]
    assert claim(server, 8)["job"]["id"] == cpu["id"]
    assert claim(server, 8) is None
    assert httpx.get(f"{server}/v1/jobs/{a2['id']}", headers=ADMIN).json()["status"] == "queued"
    # When her first job ends, her second may run.
    done = {"lease_token": first["lease"]["lease_token"], "status": "succeeded"}
    r = httpx.post(f"{server}/v1/agent/jobs/{a1['id']}/finish", json=done, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert claim(server, 8)["job"]["id"] == a2["id"]
