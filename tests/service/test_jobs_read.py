"""Reading jobs: GET /v1/jobs (newest first, cursor pages, filters), GET /v1/jobs/{id}, the
model artifact, and isolation (another owner's job is a 404 on every route)."""

from __future__ import annotations

import json

import pytest
from service_support import ADMIN, claim, submit


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


def test_in_range_id_of_no_job_is_404(client, alice):
    for job_id in (0, 2**63 - 1):
        r = client.get(f"/v1/jobs/{job_id}", headers=alice)
        assert r.status_code == 404 and r.json()["code"] == "job_not_found"


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


def test_get_job_body_is_the_models_json(app, client, alice, agent):
    """get-job sends pre-built bytes (one Core statement, no response validation): they must
    say exactly what JobPublic says for the same job, queued, running with progress and
    metrics, and finished with an error, with and without metrics."""
    from service.job_reads import job_by_id

    running = submit(client, alice, name="running", tags=["b", "a"])
    finished = submit(client, alice, name="failed, no metrics")
    lease = claim(client, agent)["lease"]["lease_token"]  # claims `running` (the oldest)
    r = client.post(
        f"/v1/agent/jobs/{running['id']}/heartbeat",
        json={"lease_token": lease, "progress": {"epoch": 1, "epochs": 4, "step": 10}},
        headers=agent,
    )
    assert r.status_code == 200, r.text
    points = [
        {"name": "loss", "step": 3, "value": 0.25, "epoch": 0},
        {"name": "loss", "step": 7, "value": 1e-9},
        {"name": "val/acc", "step": 7, "value": 1.0, "epoch": 1, "time": "2026-01-02T03:04:05Z"},
    ]
    r = client.post(
        f"/v1/agent/jobs/{running['id']}/metrics",
        json={"lease_token": lease, "points": points},
        headers=agent,
    )
    assert r.status_code == 200, r.text
    lease2 = claim(client, agent, agent_id="a2")["lease"]["lease_token"]  # claims `finished`
    r = client.post(
        f"/v1/agent/jobs/{finished['id']}/finish",
        json={"lease_token": lease2, "status": "failed", "error": {"type": "E", "message": "m"}},
        headers=agent,
    )
    assert r.status_code == 200, r.text
    queued = [submit(client, alice, priority=p)["id"] for p in (0, 5)]  # positions 2 and 1

    seen = {}
    with app.state.xsam.reader() as session:
        for job_id in (running["id"], finished["id"], *queued):
            expected = job_by_id(session, job_id).model_dump(mode="json")
            r = client.get(f"/v1/jobs/{job_id}", headers=alice)
            assert r.status_code == 200 and r.headers["content-type"] == "application/json"
            # Canonical dumps, so that 1 and 1.0 (or a missing key and a null) differ.
            assert json.dumps(r.json(), sort_keys=True) == json.dumps(expected, sort_keys=True)
            seen[job_id] = r.json()
    assert set(seen[running["id"]]["latest_metrics"]) == {"loss", "val/acc"}
    assert seen[running["id"]]["tags"] == ["a", "b"]
    assert seen[running["id"]]["progress"]["fraction"] == 0.25
    assert seen[finished["id"]]["latest_metrics"] == {} and seen[finished["id"]]["error"]
    assert [seen[j]["queue_position"] for j in queued] == [2, 1]
