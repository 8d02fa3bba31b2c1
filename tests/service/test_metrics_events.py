"""Metric ingest and downsampling; the event log's resumption and key deduplication."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from service_support import claim, submit


@pytest.fixture
def running(client, alice, agent):
    """A running job and a function that posts to its agent routes with the right lease."""
    job = submit(client, alice)
    lease = claim(client, agent)["lease"]["lease_token"]

    def post(path: str, **body):
        # allow_nan: send what a careless agent would (Python's json writes Infinity).
        content = json.dumps({"lease_token": lease, **body}, allow_nan=True)
        return client.post(
            f"/v1/agent/jobs/{job['id']}/{path}",
            content=content,
            headers={**agent, "Content-Type": "application/json"},
        )

    return job["id"], post


def test_metric_ingest_is_idempotent(client, alice, running):
    job_id, post = running
    batch = [{"name": "loss", "step": s, "value": 1.0 / s, "epoch": 1} for s in range(1, 101)]
    assert post("metrics", points=batch).json() == {"received": 100, "inserted": 100}
    # A replay (even with other values) changes nothing.
    replay = [{**p, "value": 99.0} for p in batch]
    assert post("metrics", points=replay).json() == {"received": 100, "inserted": 0}
    series = client.get(f"/v1/jobs/{job_id}/metrics", headers=alice).json()["series"]["loss"]
    assert len(series) == 100 and series[0] == {
        "step": 1, "value": 1.0, "epoch": 1, "time": series[0]["time"],
    }  # fmt: skip
    latest = client.get(f"/v1/jobs/{job_id}/metrics/latest", headers=alice).json()
    assert latest["job_id"] == job_id and latest["metrics"]["loss"]["step"] == 100
    assert latest["metrics"]["loss"]["value"] == pytest.approx(0.01)
    job = client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    assert job["latest_metrics"]["loss"]["step"] == 100


def test_non_finite_values_are_refused_naming_the_field(running):
    _, post = running
    r = post("metrics", points=[{"name": "loss", "step": 1, "value": math.inf}])
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "points", 0, "value"]


@pytest.mark.parametrize(
    ("path", "body", "loc"),
    [
        # an epoch past the INTEGER column
        ("metrics", {"points": [{"name": "a", "step": 1, "value": 1, "epoch": 2**31}]},
         ["body", "points", 0, "epoch"]),
        ("metrics", {"points": [{"name": "a", "step": 2**63, "value": 1}]},
         ["body", "points", 0, "step"]),
        # a time that has no UTC equivalent
        ("metrics", {"points": [{"name": "a", "step": 1, "value": 1,
                                 "time": "0001-01-01T00:00:00+05:00"}]},
         ["body", "points", 0, "time"]),
        ("events", {"events": [{"type": "log", "time": "9999-12-31T23:00:00-05:00"}]},
         ["body", "events", 0, "time"]),
        # NUL, which PostgreSQL text and JSON refuse, in a name, a message, nested data
        ("metrics", {"points": [{"name": "a\x00", "step": 1, "value": 1}]},
         ["body", "points", 0, "name"]),
        ("events", {"events": [{"type": "log", "message": "\x00"}]},
         ["body", "events", 0, "message"]),
        ("events", {"events": [{"type": "log", "data": {"k": ["\x00"]}}]},
         ["body", "events", 0, "data", "k", 0]),
        ("heartbeat", {"progress": {"step": 2**63}}, ["body", "progress", "step"]),
        ("finish", {"status": "failed", "error": {"type": "x\x00"}},
         ["body", "error", "type"]),
        # nesting too deep to serialise into a JSON column (was a RecursionError)
        ("events", {"events": [{"type": "log", "data": {"k": json.loads("[" * 600 + "]" * 600)}}]},
         ["body", "events", 0, "data", "k", *[0] * 28]),
    ],
)  # fmt: skip
def test_ingest_of_unstorable_values_is_422_not_500(client, alice, running, path, body, loc):
    job_id, post = running
    r = post(path, **body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == loc
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).json()["status"] == "running"


def test_downsampling_keeps_a_one_step_spike(client, alice, running):
    job_id, post = running
    points = [{"name": "loss", "step": s, "value": 1.0} for s in range(1, 4001)]
    points[3210]["value"] = 1000.0  # one step
    points += [{"name": "acc", "step": s, "value": s / 10} for s in range(1, 11)]
    post("metrics", points=points)
    body = client.get(f"/v1/jobs/{job_id}/metrics", params={"max_points": 50}, headers=alice).json()
    assert body["job_id"] == job_id
    loss = body["series"]["loss"]
    assert len(loss) == 50
    assert sum(b["count"] for b in loss) == 4000
    spike = [b for b in loss if b["max"] == 1000.0]
    assert len(spike) == 1 and spike[0]["step_min"] <= 3211 <= spike[0]["step_max"]
    assert spike[0]["min"] == 1.0 and spike[0]["mean"] > 1.0
    # step/value are the bucket's last point; buckets are in step order and do not overlap.
    assert all(b["step"] == b["step_max"] and b["value"] == 1.0 for b in loss)
    assert all(a["step_max"] < b["step_min"] for a, b in itertools.pairwise(loss))
    # A series under max_points comes back raw.
    assert [p["step"] for p in body["series"]["acc"]] == list(range(1, 11))
    assert "min" not in body["series"]["acc"][0]


def test_metric_query_filters(client, alice, running):
    job_id, post = running
    post(
        "metrics",
        points=[{"name": n, "step": s, "value": s} for n in ("a", "b", "c") for s in range(10)],
    )
    body = client.get(
        f"/v1/jobs/{job_id}/metrics",
        params={"names": "a,c", "since_step": 3, "until_step": 5},
        headers=alice,
    ).json()
    assert {n: [p["step"] for p in s] for n, s in body["series"].items()} == {
        "a": [3, 4, 5],
        "c": [3, 4, 5],
    }


def test_events_resume_after_and_drop_replayed_keys(client, alice, running):
    job_id, post = running
    batch = [
        {"type": "started", "message": "epoch 1", "key": "started"},
        {"type": "log", "message": "line 1"},
        {
            "type": "epoch_done",
            "message": "epoch 1 done",
            "data": {"epoch": 1},
            "key": "epoch_done:1",
        },
    ]
    assert post("events", events=batch).json() == {"received": 3, "inserted": 3}
    # A resumed attempt replays its keyed events: they are dropped; unkeyed lines are kept.
    assert post("events", events=batch).json() == {"received": 3, "inserted": 1}
    url = f"/v1/jobs/{job_id}/events"
    first = client.get(url, params={"limit": 3}, headers=alice).json()
    assert [e["type"] for e in first["items"]] == ["queued", "claimed", "started"]
    rest = client.get(url, params={"after": first["next_after"]}, headers=alice).json()
    assert [e["message"] for e in rest["items"]] == ["line 1", "epoch 1 done", "line 1"]
    assert rest["items"][1]["data"] == {"epoch": 1}
    ids = [e["id"] for e in first["items"] + rest["items"]]
    assert ids == sorted(ids)
    empty = client.get(url, params={"after": rest["next_after"]}, headers=alice).json()
    assert empty == {"items": [], "next_after": rest["next_after"]}
