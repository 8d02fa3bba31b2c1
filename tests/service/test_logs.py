"""Job logs over HTTP: ingest under the lease, replays, order per rank, the cap, retries."""

from __future__ import annotations

import pytest
from service_support import claim, make_settings, submit

from service.app import create_app


def _lines(rank: int, seqs, stream: str = "stdout"):
    return [{"rank": rank, "seq": s, "stream": stream, "text": f"r{rank} line {s}"} for s in seqs]


@pytest.fixture
def running(client, alice, agent):
    job = submit(client, alice)
    lease = claim(client, agent)["lease"]["lease_token"]

    def post(lines, token=lease):
        return client.post(
            f"/v1/agent/jobs/{job['id']}/logs",
            json={"lease_token": token, "lines": lines},
            headers=agent,
        )

    return job["id"], post, lease


def _all(client, headers, job_id, **params):
    items, after = [], 0
    while True:
        page = client.get(
            f"/v1/jobs/{job_id}/logs",
            params={**params, "after": after, "limit": 7},
            headers=headers,
        ).json()
        items += page["items"]
        if not page["items"]:
            return items, page["dropped"]
        after = page["next_after"]


def test_lines_arrive_in_order_per_rank_and_a_replay_changes_nothing(client, alice, running):
    job_id, post, _ = running
    # Two ranks interleaved, one batch out of seq order: each rank's lines read back in seq order.
    batch = _lines(1, [2, 0, 1]) + _lines(0, range(3), "stderr")
    assert post(batch).json() == {"received": 6, "inserted": 6}
    assert post(_lines(0, [3])).json() == {"received": 1, "inserted": 1}
    assert post(batch).json() == {"received": 6, "inserted": 0}  # a replay
    items, dropped = _all(client, alice, job_id)
    assert dropped == 0 and len(items) == 7
    for rank, n in ((0, 4), (1, 3)):
        texts = [i["text"] for i in items if i["rank"] == rank]
        assert texts == [f"r{rank} line {s}" for s in range(n)]
    assert {i["attempt"] for i in items} == {1}
    assert [i["stream"] for i in items if i["rank"] == 0] == ["stderr"] * 3 + ["stdout"]
    only_1, _ = _all(client, alice, job_id, rank=1)
    assert [i["rank"] for i in only_1] == [1, 1, 1]
    ids = [i["id"] for i in items]
    assert ids == sorted(ids)


def test_a_stale_lease_is_refused_and_another_owner_sees_nothing(client, alice, bob, running):
    job_id, post, _ = running
    assert post(_lines(0, [0]), token="stale").status_code == 409
    assert client.get(f"/v1/jobs/{job_id}/logs", headers=bob).status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/logs", headers=alice).json()["items"] == []


def test_a_failed_job_carries_the_traceback(client, alice, agent, running):
    job_id, _, lease = running
    traceback = 'Traceback (most recent call last):\n  File "t.py", line 1\nValueError: boom'
    error = {"type": "infrastructure_error", "message": "ValueError: boom", "traceback": traceback}
    r = client.post(
        f"/v1/agent/jobs/{job_id}/finish",
        json={"lease_token": lease, "status": "failed", "error": error},
        headers=agent,
    )
    assert r.status_code == 200, r.text
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).json()["error"] == error


def test_the_cap_keeps_head_and_tail_and_counts_what_it_dropped(db_url, tmp_path):
    from fastapi.testclient import TestClient
    from service_support import new_token

    settings = make_settings(db_url, tmp_path, max_log_lines_per_job=10)
    with TestClient(create_app(settings)) as client:
        alice, agent = new_token(client, "alice"), new_token(client, "agent-1", "agent")
        job_id = submit(client, alice)["id"]
        lease = claim(client, agent)["lease"]["lease_token"]

        def post(lines):
            body = {"lease_token": lease, "lines": lines}
            r = client.post(f"/v1/agent/jobs/{job_id}/logs", json=body, headers=agent)
            assert r.status_code == 200, r.text
            return r.json()

        for start in range(0, 30, 4):  # 30 lines in batches of 4
            post(_lines(0, range(start, min(start + 4, 30))))
        # A replay of a line the cap dropped is still a replay.
        assert post(_lines(0, [12]))["inserted"] == 0
        items, dropped = _all(client, alice, job_id)
        seqs = [int(i["text"].rsplit(" ", 1)[1]) for i in items]
        assert seqs == [0, 1, 2, 3, 4, 25, 26, 27, 28, 29]
        assert dropped == 20


def test_logs_of_every_attempt_survive_a_retry(db_url, tmp_path):
    from fastapi.testclient import TestClient
    from service_support import new_token
    from sqlalchemy import update

    from service.app import reap_once
    from service.db.engine import run_in_transaction
    from service.db.models import Job

    settings = make_settings(db_url, tmp_path)
    app = create_app(settings)
    with TestClient(app) as client:
        alice, agent = new_token(client, "alice"), new_token(client, "agent-1", "agent")
        job_id = submit(client, alice, max_attempts=2)["id"]
        for attempt in (1, 2):
            lease = claim(client, agent)["lease"]
            assert lease["attempt"] == attempt
            body = {"lease_token": lease["lease_token"], "lines": _lines(0, range(2))}
            r = client.post(f"/v1/agent/jobs/{job_id}/logs", json=body, headers=agent)
            assert r.json()["inserted"] == 2  # the same seqs, a new attempt: new lines
            if attempt == 1:
                # The heartbeats stop: the lease runs out (set by hand, not waited for).
                run_in_transaction(
                    app.state.xsam.writer,
                    lambda s: s.execute(
                        update(Job).where(Job.id == job_id).values(lease_expires_at=Job.created_at)
                    ),
                )
                assert reap_once(app.state.xsam) == 1
        items, _ = _all(client, alice, job_id)
        assert [i["attempt"] for i in items] == [1, 1, 2, 2]
        second, _ = _all(client, alice, job_id, attempt=2)
        assert [i["attempt"] for i in second] == [2, 2]


def test_xsam_logs_follows_a_running_job_to_its_end(live_server, capsys):
    import threading
    import time

    from service_support import ADMIN_SECRET, CONFIG

    from cli import main
    from service.client import XsamClient

    admin = XsamClient(live_server.url, ADMIN_SECRET)
    token = admin.create_token("carol").token
    user = XsamClient(live_server.url, token)
    agent = XsamClient(live_server.url, admin.create_token("box", "agent").token)
    job_id = user.submit(CONFIG).id
    claimed = agent.claim("a1", 4, 0)
    assert claimed is not None
    lease = claimed.lease.lease_token
    agent.ingest_logs(job_id, lease, _lines(0, range(3)) + _lines(1, range(2)))

    def the_run_goes_on():
        time.sleep(0.6)
        agent.ingest_logs(job_id, lease, _lines(0, range(3, 5)))
        time.sleep(0.6)
        agent.ingest_logs(job_id, lease, [{**_lines(0, [5])[0], "stream": "log",
                                           "level": "ERROR", "text": "the end"}])  # fmt: skip
        agent.finish(job_id, lease, "failed", {"type": "boom", "message": "x"})

    feeder = threading.Thread(target=the_run_goes_on)
    feeder.start()
    args = ["logs", "-f", str(job_id), "--interval", "0.2"]
    code = main([*args, "--server", live_server.url, "--token", token])
    feeder.join()
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert [line for line in out if "r0]" in line] == [
        *(f"[a1 r0] r0 line {s}" for s in range(5)),
        "[a1 r0] ERROR the end",
    ]
    assert [line for line in out if "r1]" in line] == [f"[a1 r1] r1 line {s}" for s in range(2)]
    code = main(["logs", str(job_id), "--rank", "1", "--attempt", "1",
                 "--server", live_server.url, "--token", token])  # fmt: skip
    assert capsys.readouterr().out.splitlines() == ["r1 line 0", "r1 line 1"]
