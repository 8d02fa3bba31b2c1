"""Clients whose request bodies stall mid-stream, against a real `xsam serve --no-agent` on its
embedded SQLite (where one held write lock would stop every writer): the stalled requests hold
no database lock and no worker thread, so submits, claims, heartbeats, ingest and finish go on;
a stalled body that resumes is stored whole, one abandoned midway stores nothing."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
from fault_support import Api
from process_support import free_port
from ray_support import tiny_config

from service.client import XsamClient

pytestmark = pytest.mark.slow

#: More stalled requests than anyio's default thread pool (40): a stall that held a worker
#: thread each would starve every synchronous route.
STALLED = 50


@pytest.fixture
def server(tmp_path) -> Iterator[tuple[Api, XsamClient]]:
    api = Api(tmp_path / "serve", free_port()).start()
    try:
        with api.admin() as client:
            yield api, client
    finally:
        api.stop()


def start_request(serve: Api, path: str, body: bytes) -> socket.socket:
    """Send the head and the first half of the body, then nothing more (yet)."""
    host, port = serve.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {serve.token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body[: len(body) // 2])
    return sock


def finish_request(sock: socket.socket, body: bytes) -> tuple[int, dict]:
    """Send the rest of the body; the status and JSON of the reply."""
    sock.sendall(body[len(body) // 2 :])
    with sock, sock.makefile("rb") as reply:
        status = int(reply.readline().split()[1])
        length = 0
        while (line := reply.readline().strip()) != b"":
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        return status, json.loads(reply.read(length))


def metrics_body(lease_token: str, name: str, steps: range) -> bytes:
    points = [{"name": name, "step": s, "value": float(s)} for s in steps]
    return json.dumps({"lease_token": lease_token, "points": points}).encode()


@pytest.mark.timeout(180)
def test_stalled_bodies_block_no_one_and_a_resumed_one_is_stored_whole(server):
    serve, api = server
    job = api.submit(tiny_config(), name="stalled")
    claim = api.claim("a", 1, 0)
    assert claim is not None and claim.job.id == job.id
    job_id, lease = job.id, claim.lease.lease_token

    resumed_body = metrics_body(lease, "stalled/resumed", range(100))
    resumed = start_request(serve, f"/v1/agent/jobs/{job_id}/metrics", resumed_body)
    abandoned_body = metrics_body(lease, "stalled/abandoned", range(100))
    stalled = [
        start_request(serve, f"/v1/agent/jobs/{job_id}/metrics", abandoned_body)
        for _ in range(STALLED // 2)
    ]
    submit_body = json.dumps({"name": "abandoned", "config": tiny_config()}).encode()
    stalled += [start_request(serve, "/v1/jobs", submit_body) for _ in range(STALLED // 2)]

    # Everyone else is served while those bodies hang (each call is bounded by the client's
    # 30 s timeout: a blocked server fails the test, it does not hang it).
    other = api.submit(tiny_config(), name="other")
    assert api.heartbeat(job_id, lease).cancel_requested is False
    api.ingest_metrics(job_id, lease, [{"name": "live", "step": 0, "value": 1.0}])
    assert api.ready()

    status, reply = finish_request(resumed, resumed_body)
    assert status == 200, reply
    for sock in stalled:  # abandoned midway: the server sees the connection close
        sock.close()

    api.finish(job_id, lease, "succeeded")
    second = api.claim("a", 1, 0)
    assert second is not None and second.job.id == other.id
    api.finish(other.id, second.lease.lease_token, "succeeded")

    series = api.metrics(job_id, names=["stalled/resumed", "stalled/abandoned", "live"]).series
    assert [p.step for p in series["stalled/resumed"]] == list(range(100))
    assert series.get("stalled/abandoned", []) == []
    assert len(series["live"]) == 1
    names = sorted(j.name or "" for j in api.iter_jobs(page_size=100))
    assert names == ["other", "stalled"]  # no half-sent submit became a job
