"""The queue: claim races, leases and the reaper, fencing, cancellation, claim order."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from service_support import ADMIN, ADMIN_SECRET, CONFIG, LiveServer, claim, make_settings, submit
from sqlalchemy import update

from service import queue
from service.app import reap_once
from service.db.engine import run_in_transaction
from service.db.models import Job
from xsam.config import TrainConfig


def _enqueue_many(state, n: int) -> list[int]:
    config = TrainConfig.model_validate(CONFIG)

    def work(session):
        return [queue.enqueue(session, owner="alice", config=config)[0].id for _ in range(n)]

    return run_in_transaction(state.writer, work)


def test_eight_claimers_race_over_500_jobs_each_claimed_once(app):
    state = app.state.xsam
    ids = _enqueue_many(state, 500)
    claimed: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def claimer(n: int) -> None:
        start.wait()
        try:
            while True:
                job = run_in_transaction(
                    state.writer,
                    lambda s: queue.claim_next(
                        s, agent_id=f"agent-{n}", cpus=1, gpus=0, policy=state.policy
                    ),
                )
                if job is None:
                    return
                with lock:
                    claimed.append(job.id)
        except BaseException as exc:  # reported below, never swallowed
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a claimer is stuck (deadlock?)"
    assert not errors, errors
    counts = Counter(claimed)
    assert sorted(counts) == sorted(ids), "a job was lost"
    assert set(counts.values()) == {1}, "a job was claimed twice"
    state.engine.dispose()


def test_claim_order_priority_then_age_and_capacity(client, alice, agent):
    low = submit(client, alice, priority=0)
    four = {"resources": {"num_workers": 4}, "data": {**CONFIG["data"], "batch_size": 128}}
    big = submit(client, alice, priority=5, config={**CONFIG, **four})
    gpu = submit(client, alice, priority=9, config={**CONFIG, "resources": {"use_gpu": True}})
    high_old = submit(client, alice, priority=5)
    high_new = submit(client, alice, priority=5)
    # queue_position follows claim order (ignoring capacity): gpu, big, high_old, high_new, low
    positions = {
        j["id"]: client.get(f"/v1/jobs/{j['id']}", headers=alice).json()["queue_position"]
        for j in (gpu, big, high_old, high_new, low)
    }
    assert [positions[j["id"]] for j in (gpu, big, high_old, high_new, low)] == [1, 2, 3, 4, 5]
    # 2 CPUs and no GPU: the GPU job and the 4-CPU job do not fit.
    order = [claim(client, agent, cpus=2, gpus=0)["job"]["id"] for _ in range(3)]
    assert order == [high_old["id"], high_new["id"], low["id"]]
    assert claim(client, agent, cpus=2, gpus=0) is None
    assert claim(client, agent, cpus=8, gpus=1)["job"]["id"] == gpu["id"]
    assert claim(client, agent, cpus=8, gpus=1)["job"]["id"] == big["id"]


def test_a_claim_hands_the_agent_the_health_rules_of_the_service(client, app, alice, agent):
    # The agent applies the service's numbers (worker/health.py): one setting for a deployment.
    settings = app.state.xsam.settings
    settings.stall_min_s, settings.alpha_edge_searches = 12.5, 3
    submit(client, alice)
    lease = claim(client, agent)["lease"]
    assert lease["health"] == {
        "stall_step_multiple": 10.0,  # the default
        "stall_min_s": 12.5,
        "alpha_edge_searches": 3,
    }


def _expire(app, job_id: int) -> None:
    """Stop the clock on a lease: as if the agent's heartbeats stopped long ago."""
    state = app.state.xsam
    run_in_transaction(
        state.writer,
        lambda s: s.execute(
            update(Job).where(Job.id == job_id).values(lease_expires_at=Job.created_at)
        ),
    )


def test_stopped_heartbeats_requeue_then_fail_after_max_attempts(client, app, alice, agent):
    job = submit(client, alice, max_attempts=2)
    first = claim(client, agent)
    assert first["lease"]["attempt"] == 1
    _expire(app, job["id"])  # heartbeats stop: the lease runs out
    assert reap_once(app.state.xsam) == 1
    requeued = client.get(f"/v1/jobs/{job['id']}", headers=alice).json()
    assert requeued["status"] == "queued" and requeued["queue_position"] == 1

    second = claim(client, agent, agent_id="a2")
    assert second["job"]["id"] == job["id"] and second["lease"]["attempt"] == 2
    assert second["lease"]["lease_token"] != first["lease"]["lease_token"]
    # The first attempt's agent comes back: its lease is gone.
    r = client.post(
        f"/v1/agent/jobs/{job['id']}/heartbeat",
        json={"lease_token": first["lease"]["lease_token"]},
        headers=agent,
    )
    assert r.status_code == 409 and r.json()["code"] == "lease_lost"

    _expire(app, job["id"])
    assert reap_once(app.state.xsam) == 1
    failed = client.get(f"/v1/jobs/{job['id']}", headers=alice).json()
    assert failed["status"] == "failed" and failed["attempt"] == 2
    assert failed["error"]["type"] == "lease_expired"
    assert "2 attempts" in failed["error"]["message"]
    types = [
        e["type"] for e in client.get(f"/v1/jobs/{job['id']}/events", headers=alice).json()["items"]
    ]
    assert types == ["queued", "claimed", "requeued", "claimed", "failed"]


def test_heartbeats_keep_the_lease(client, app, alice, agent):
    # A lease far longer than the test, run out by hand before each beat: only a heartbeat that
    # renews it keeps the reaper off, however slowly the machine runs.
    app.state.xsam.policy = queue.LeasePolicy(
        heartbeat_interval_s=0.2, lease_timeout_s=3600, retry_backoff_s=0
    )
    job = submit(client, alice)
    lease = claim(client, agent)["lease"]
    for _ in range(3):
        _expire(app, job["id"])
        r = client.post(
            f"/v1/agent/jobs/{job['id']}/heartbeat",
            json={
                "lease_token": lease["lease_token"],
                "progress": {"epoch": 1, "epochs": 2, "step": 5, "steps": 20},
            },
            headers=agent,
        )
        assert r.status_code == 200 and r.json() == {"cancel_requested": False}
        assert reap_once(app.state.xsam) == 0
    body = client.get(f"/v1/jobs/{job['id']}", headers=alice).json()
    assert body["status"] == "running"
    progress = body["progress"]
    assert progress["fraction"] == 0.25 and progress["eta_s"] > 0
    assert (progress["epoch"], progress["epochs"], progress["step"], progress["steps"]) == (
        1,
        2,
        5,
        20,
    )


def test_backoff_delays_the_retry(client, app, alice, agent, settings):
    app.state.xsam.policy = queue.LeasePolicy(
        heartbeat_interval_s=0.2, lease_timeout_s=0.6, retry_backoff_s=60
    )
    job = submit(client, alice)
    claim(client, agent)
    _expire(app, job["id"])
    reap_once(app.state.xsam)
    assert client.get(f"/v1/jobs/{job['id']}", headers=alice).json()["status"] == "queued"
    assert claim(client, agent) is None  # not before now + 60 s


def test_stale_lease_token_changes_nothing(client, alice, agent):
    job = submit(client, alice)
    lease = claim(client, agent)["lease"]
    stale = {"lease_token": "0" * 32}
    url = f"/v1/agent/jobs/{job['id']}"
    for path, extra in [
        ("/heartbeat", {"progress": {"epoch": 1, "epochs": 2}}),  # no progress stored
        ("/metrics", {"points": [{"name": "loss", "step": 1, "value": 1.0}]}),  # no point stored
        ("/events", {"events": [{"type": "log", "message": "hi"}]}),  # no event stored
        ("/finish", {"status": "succeeded"}),  # the job keeps running
    ]:
        r = client.post(url + path, json={**stale, **extra}, headers=agent)
        assert r.status_code == 409, (path, r.text)
        assert r.json()["code"] == "lease_lost"
    body = client.get(f"/v1/jobs/{job['id']}", headers=alice).json()
    assert body["status"] == "running" and body["progress"] is None
    assert body["latest_metrics"] == {}
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=alice).json()["items"]
    assert [e["type"] for e in events] == ["queued", "claimed"]
    # The real token still works, and a replayed finish is accepted once done.
    for _ in range(2):
        r = client.post(
            url + "/finish",
            json={"lease_token": lease["lease_token"], "status": "succeeded"},
            headers=agent,
        )
        assert r.status_code == 200 and r.json()["status"] == "succeeded"
    r = client.post(url + "/heartbeat", json={"lease_token": lease["lease_token"]}, headers=agent)
    assert r.status_code == 409


def test_agent_route_on_missing_job_is_404(client, agent):
    r = client.post("/v1/agent/jobs/999/heartbeat", json={"lease_token": "x"}, headers=agent)
    assert r.status_code == 404 and r.json()["code"] == "job_not_found"


def test_cancel_queued_is_immediate(client, alice, agent):
    job = submit(client, alice)
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert r.json()["finished_at"] is not None
    assert claim(client, agent) is None
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
    assert r.status_code == 409 and r.json()["code"] == "job_finished"


def test_cancel_running_is_delivered_by_heartbeat(client, alice, agent):
    job = submit(client, alice)
    lease = claim(client, agent)["lease"]
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
    assert r.status_code == 200
    assert r.json()["status"] == "running" and r.json()["cancel_requested"] is True
    hb = client.post(
        f"/v1/agent/jobs/{job['id']}/heartbeat",
        json={"lease_token": lease["lease_token"]},
        headers=agent,
    )
    assert hb.json() == {"cancel_requested": True}
    done = client.post(
        f"/v1/agent/jobs/{job['id']}/finish",
        json={"lease_token": lease["lease_token"], "status": "cancelled"},
        headers=agent,
    )
    assert done.json()["status"] == "cancelled"
    types = [
        e["type"] for e in client.get(f"/v1/jobs/{job['id']}/events", headers=alice).json()["items"]
    ]
    assert types == ["queued", "claimed", "cancel_requested", "cancelled"]


def test_cancel_requested_and_lease_expired_ends_cancelled(client, app, alice, agent):
    job = submit(client, alice)
    claim(client, agent)
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
    _expire(app, job["id"])
    assert reap_once(app.state.xsam) == 1
    body = client.get(f"/v1/jobs/{job['id']}", headers=alice).json()
    assert body["status"] == "cancelled" and body["error"] is None


def test_failed_finish_keeps_the_error(client, alice, agent):
    job = submit(client, alice)
    lease = claim(client, agent)["lease"]
    error = {"type": "diverged", "message": "loss is NaN at step 12"}
    r = client.post(
        f"/v1/agent/jobs/{job['id']}/finish",
        json={"lease_token": lease["lease_token"], "status": "failed", "error": error},
        headers=agent,
    )
    assert r.status_code == 200
    body = client.get(f"/v1/jobs/{job['id']}", headers=alice).json()
    assert body["status"] == "failed" and body["error"] == error
    last = client.get(f"/v1/jobs/{job['id']}/events", headers=alice).json()["items"][-1]
    assert last["type"] == "failed" and last["data"]["error"] == error


def test_admin_may_call_agent_routes(client, alice):
    submit(client, alice)
    assert claim(client, ADMIN)["lease"]["attempt"] == 1


def test_the_app_reaps_periodically(db_url, tmp_path):

    from service.client import XsamClient

    settings = make_settings(db_url, tmp_path, run_reaper=True, reaper_interval_s=0.1)
    with LiveServer(settings) as server, XsamClient(server.url, ADMIN_SECRET) as api:
        job = api.submit(CONFIG, max_attempts=1)
        assert api.claim("a1", 1, 0) is not None
        # The reaper runs every 0.1 s and the lease lasts seconds: ten seconds is ample.
        done = api.wait_for_job(job.id, timeout=10, poll_s=0.1)
        assert done.status == "failed" and done.error is not None
        assert done.error.type == "lease_expired"


def _release(client, headers, job_id: int, lease_token: str, reason: str | None = "shutdown"):
    body: dict[str, str] = {"lease_token": lease_token}
    if reason is not None:
        body["reason"] = reason
    return client.post(f"/v1/agent/jobs/{job_id}/release", json=body, headers=headers)


def _event_types(client, headers, job_id: int) -> list[str]:
    items = client.get(f"/v1/jobs/{job_id}/events", headers=headers).json()["items"]
    return [e["type"] for e in items]


def test_release_requeues_at_once_without_counting_the_attempt(client, app, alice, agent):
    app.state.xsam.policy = queue.LeasePolicy(
        heartbeat_interval_s=0.2, lease_timeout_s=0.6, retry_backoff_s=60
    )  # a backoff, were one applied, would keep the job from the next claim
    job = submit(client, alice, max_attempts=1)
    first = claim(client, agent)["lease"]
    r = _release(client, agent, job["id"], first["lease_token"], "agent shutting down")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "queued" and body["attempt"] == 0 and body["queue_position"] == 1
    assert body["finished_at"] is None
    released = client.get(f"/v1/jobs/{job['id']}/events", headers=alice).json()["items"][-1]
    assert released["type"] == "released"
    assert released["data"] == {"attempt": 1, "reason": "agent shutting down"}

    # No backoff, and the same attempt number again: max_attempts=1 still allows the run.
    second = claim(client, agent, agent_id="a2")
    assert second is not None and second["job"]["id"] == job["id"]
    assert second["lease"]["attempt"] == 1
    assert second["lease"]["lease_token"] != first["lease_token"]
    # Released twice, still attempt 1 of 1: releases never use up the budget.
    assert _release(client, agent, job["id"], second["lease"]["lease_token"]).status_code == 200
    third = claim(client, agent)
    assert third["lease"]["attempt"] == 1
    # A lease that really expires does count: attempt 1 of 1 was the last one.
    _expire(app, job["id"])
    assert reap_once(app.state.xsam) == 1
    failed = client.get(f"/v1/jobs/{job['id']}", headers=alice).json()
    assert failed["status"] == "failed" and failed["error"]["type"] == "lease_expired"
    assert _event_types(client, alice, job["id"]) == [
        "queued", "claimed", "released", "claimed", "released", "claimed", "failed",
    ]  # fmt: skip


def test_release_fences_the_old_lease_token(client, alice, agent):
    job = submit(client, alice)
    old = claim(client, agent)["lease"]["lease_token"]
    assert _release(client, agent, job["id"], old, reason=None).status_code == 200
    url = f"/v1/agent/jobs/{job['id']}"
    for path, extra in [
        ("/heartbeat", {}),  # while queued
        ("/metrics", {"points": [{"name": "loss", "step": 1, "value": 1.0}]}),
        ("/events", {"events": [{"type": "log", "message": "late"}]}),
        ("/finish", {"status": "succeeded"}),
        ("/release", {}),  # a replayed release too
    ]:
        r = client.post(url + path, json={"lease_token": old, **extra}, headers=agent)
        assert r.status_code == 409 and r.json()["code"] == "lease_lost", (path, r.text)
    new = claim(client, agent)["lease"]["lease_token"]
    r = client.post(url + "/heartbeat", json={"lease_token": old}, headers=agent)
    assert r.status_code == 409  # and once it is running again under a new lease
    r = client.post(url + "/heartbeat", json={"lease_token": new}, headers=agent)
    assert r.status_code == 200
    body = client.get(f"/v1/jobs/{job['id']}", headers=alice).json()
    assert body["status"] == "running" and body["latest_metrics"] == {}
    assert "log" not in _event_types(client, alice, job["id"])


def test_release_with_a_cancel_requested_cancels(client, alice, agent):
    job = submit(client, alice)
    lease = claim(client, agent)["lease"]
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
    r = _release(client, agent, job["id"], lease["lease_token"])
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "cancelled" and body["finished_at"] is not None
    assert body["attempt"] == 1  # the attempt ended (cancelled), so it stays counted
    assert claim(client, agent) is None
    assert _event_types(client, alice, job["id"]) == [
        "queued", "claimed", "cancel_requested", "cancelled",
    ]  # fmt: skip


def test_release_with_a_stale_token_is_409_and_changes_nothing(client, app, alice, agent):
    job = submit(client, alice, max_attempts=3)
    first = claim(client, agent)["lease"]["lease_token"]
    _expire(app, job["id"])
    assert reap_once(app.state.xsam) == 1  # requeued: attempt 1 used
    second = claim(client, agent)["lease"]
    for stale in (first, "0" * 32):  # a previous attempt's token, one never handed out
        r = _release(client, agent, job["id"], stale)
        assert r.status_code == 409 and r.json()["code"] == "lease_lost", r.text
    body = client.get(f"/v1/jobs/{job['id']}", headers=alice).json()
    assert body["status"] == "running" and body["attempt"] == second["attempt"] == 2
    assert "released" not in _event_types(client, alice, job["id"])
    r = _release(client, agent, 999, "0" * 32)
    assert r.status_code == 404 and r.json()["code"] == "job_not_found"
    r = _release(client, alice, job["id"], second["lease_token"])
    assert r.status_code == 403  # a user token may not release


def test_client_release_over_http(live_server):
    from service.client import LeaseLost, XsamClient

    with XsamClient(live_server.url, ADMIN_SECRET) as api:
        job = api.submit(CONFIG)
        claimed = api.claim("a1", 4, 0)
        assert claimed is not None
        lease = claimed.lease
        released = api.release(job.id, lease.lease_token, reason="test")
        assert released.status == "queued" and released.attempt == 0
        with pytest.raises(LeaseLost):
            api.release(job.id, lease.lease_token)
        again = api.claim("a1", 4, 0)
        assert again is not None and again.lease.attempt == 1
