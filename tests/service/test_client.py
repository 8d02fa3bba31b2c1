"""The typed client over real HTTP on loopback, and `xsam serve --no-agent` / `xsam token`."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading

import pytest
from service_support import ADMIN_SECRET, CONFIG, free_port, serve_subprocess, wait_ready

from service.client import (
    ApiError,
    Conflict,
    Forbidden,
    LeaseLost,
    NotFound,
    ServiceUnreachable,
    Unauthorized,
    XsamClient,
    default_server_and_token,
)
from service.contract import HeartbeatPublic


def test_a_job_from_submit_to_download(live_server, settings, tmp_path):
    admin = XsamClient(live_server.url, ADMIN_SECRET)
    user = XsamClient(live_server.url, admin.create_token("alice", "user").token)
    agent = XsamClient(live_server.url, admin.create_token("gpu-box", "agent").token)

    job = user.submit(CONFIG, name="digits", tags=["t"], idempotency_key="k1")
    assert user.submit(CONFIG, name="digits", tags=["t"], idempotency_key="k1").id == job.id
    with pytest.raises(Conflict):  # the same key with another body
        user.submit(CONFIG, idempotency_key="k1")
    assert user.list_jobs(tag="t").items[0].id == job.id

    claimed = agent.claim("gpu-box", cpus=4, gpus=0)
    assert claimed is not None and claimed.job.id == job.id
    lease = claimed.lease.lease_token
    assert agent.claim("gpu-box", cpus=4, gpus=0) is None
    assert agent.heartbeat(job.id, lease, {"epoch": 1, "epochs": 2}) == HeartbeatPublic(
        cancel_requested=False
    )
    points = [{"name": "loss", "step": s, "value": 2.0 / s} for s in range(1, 11)]
    assert agent.ingest_metrics(job.id, lease, points).inserted == 10
    agent.ingest_events(job.id, lease, [{"type": "epoch_done", "message": "1", "key": "e:1"}])
    weights = settings.artifacts_path / f"job-{job.id}" / "model.pt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"w" * 100_000)
    assert agent.finish(job.id, lease, "succeeded").status == "succeeded"

    assert user.get_job(job.id).status == "succeeded"
    assert user.metrics(job.id, names=["loss"], max_points=5).series["loss"][-1].step == 10
    assert user.latest_metrics(job.id).metrics["loss"].step == 10
    events = user.events(job.id)
    assert events.items[-1].type == "succeeded"
    assert user.events(job.id, after=events.next_after).items == []
    path = user.download_model(job.id, tmp_path)
    assert path.read_bytes() == b"w" * 100_000

    # Errors arrive as typed exceptions carrying status, code and detail.
    with pytest.raises(Conflict) as exc:
        user.cancel(job.id)
    assert (exc.value.status, exc.value.code) == (409, "job_finished")
    with pytest.raises(LeaseLost):
        agent.heartbeat(job.id, lease)
    with pytest.raises(NotFound):
        XsamClient(live_server.url, admin.create_token("bob").token).get_job(job.id)
    with pytest.raises(Forbidden):
        user.claim("x", 1, 0)
    with pytest.raises(Unauthorized):
        XsamClient(live_server.url, "wrong").list_jobs()
    with pytest.raises(ApiError) as exc:
        user.submit({**CONFIG, "optimizer": {"rho": -1}})
    assert exc.value.status == 422
    assert exc.value.detail[0]["loc"] == ["body", "config", "optimizer", "rho"]
    tokens = admin.list_tokens()
    bob = next(t for t in tokens if t.name == "bob")
    admin.revoke_token(bob.id)
    for c in (admin, user, agent):
        c.close()


def test_claimers_race_over_http(live_server):
    admin = XsamClient(live_server.url, ADMIN_SECRET)
    ids = {admin.submit(CONFIG).id for _ in range(40)}
    got: list[int] = []
    lock = threading.Lock()

    def claimer(n: int) -> None:
        with XsamClient(live_server.url, ADMIN_SECRET) as api:
            while (c := api.claim(f"agent-{n}", 1, 0)) is not None:
                with lock:
                    got.append(c.job.id)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(got) == sorted(ids)


def test_unreachable_service():
    with pytest.raises(ServiceUnreachable) as exc:
        XsamClient(f"http://127.0.0.1:{free_port()}", "t", timeout=2).get_job(1)
    assert exc.value.status == 0


def test_default_server_and_token(tmp_path, monkeypatch):
    monkeypatch.delenv("XSAM_SERVER", raising=False)
    monkeypatch.delenv("XSAM_TOKEN", raising=False)
    monkeypatch.delenv("XSAM_ADMIN_TOKEN", raising=False)
    monkeypatch.setenv("XSAM_DATA_DIR", str(tmp_path))
    assert default_server_and_token() == ("http://127.0.0.1:8000", None)
    (tmp_path / "admin.token").write_text("secret\n")
    assert default_server_and_token() == ("http://127.0.0.1:8000", "secret")
    monkeypatch.setenv("XSAM_SERVER", "http://h:1/")
    monkeypatch.setenv("XSAM_TOKEN", "env")
    assert default_server_and_token() == ("http://h:1", "env")


def test_xsam_serve_no_agent_and_token_cli(db_url, tmp_path):
    data_dir = tmp_path / "state"
    port = free_port()
    proc = serve_subprocess(data_dir, db_url, port)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc=proc)
        token_file = data_dir / "admin.token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        env = {k: v for k, v in os.environ.items() if not k.startswith("XSAM_")}
        env["XSAM_DATA_DIR"] = str(data_dir)
        out = subprocess.run(
            [sys.executable, "-m", "cli", "token", "create", "--role", "user", "--name", "dana",
             "--server", url],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        secret = out.stdout.strip()
        with XsamClient(url, secret) as dana:
            assert dana.submit(CONFIG).owner == "dana"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_client_imports_neither_fastapi_nor_sqlalchemy():
    # worker/ imports the client on GPU nodes, where the API's dependencies are not installed.
    code = (
        "import sys, service.client\n"
        "bad = [m for m in ('fastapi', 'starlette', 'sqlalchemy', 'alembic') if m in sys.modules]\n"
        "sys.exit(f'imported {bad}' if bad else 0)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
