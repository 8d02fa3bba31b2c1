"""`xsam submit|list|status|watch|metrics|cancel` against a stand-in API (httpx MockTransport),
and their one-line errors when the service is unreachable or refuses."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import httpx
import pytest

import service.client
from cli import main
from service.contract import (
    EventPublic,
    EventsPublic,
    JobPublic,
    JobsPublic,
    JobStatus,
    MetricPoint,
    MetricsPublic,
    Progress,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
# Built from the contract's models, so the stand-in cannot drift from what the server sends.
JOB = JobPublic(
    id=4, name="demo", owner="admin", status=JobStatus.RUNNING, attempt=1, max_attempts=3,
    tags=[], priority=0, created_at=T0, started_at=None, finished_at=None, error=None,
    queue_position=None, cancel_requested=False,
    config={"model": {"name": "cnn1d"}, "data": {"name": "mnist1d"}, "optimizer": {"name": "xsam"}},
    progress=Progress(epoch=2, epochs=3, step=20, steps=30),
    latest_metrics={"train/loss": MetricPoint(step=20, value=0.5, epoch=2, time=T0)},
)  # fmt: skip


def reply(model, code: int = 200, **update) -> httpx.Response:
    return httpx.Response(code, json=model.model_copy(update=update).model_dump(mode="json"))


@pytest.fixture
def fake_api(monkeypatch):
    """Route the CLI's XsamClient to a handler; returns the list of requests seen."""
    seen: list[httpx.Request] = []
    state = {"polls": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        path = request.url.path
        if path == "/v1/jobs" and request.method == "POST":
            body = json.loads(request.content)
            return reply(JOB, 201, status=JobStatus.QUEUED, config=body["config"],
                         queue_position=1)  # fmt: skip
        if path == "/v1/jobs":
            return reply(JobsPublic(items=[JOB], next_cursor=None))
        if path == "/v1/jobs/4":
            state["polls"] += 1
            status = JobStatus.SUCCEEDED if state["polls"] > 2 else JobStatus.RUNNING
            return reply(JOB, status=status)
        if path == "/v1/jobs/4/metrics":
            points = [MetricPoint(step=s, value=1.0 / s, epoch=1, time=T0) for s in (1, 2)]
            return reply(MetricsPublic(job_id=4, series={"train/loss": points}))
        if path == "/v1/jobs/4/events":
            assert request.url.params["type"] == "environment"
            after = int(request.url.params["after"])
            items = [EventPublic(id=9, time=T0, type="environment", message="",
                                 data={"attempt": 1, "rank": r, "host": f"node-{r}",
                                       "python": "3.11.7", "torch": "2.13.0", "ray": "2.60.0",
                                       "gpu": None, "gpus": 0})
                     for r in (1, 0)] if after == 0 else []  # fmt: skip
            return reply(EventsPublic(items=items, next_after=9))
        if path == "/v1/jobs/4/cancel":
            return httpx.Response(409, json={"detail": "job 4 has already finished", "code": "job_finished"})  # fmt: skip
        return httpx.Response(
            404, json={"detail": f"job not found: {path}", "code": "job_not_found"}
        )

    real = service.client.XsamClient

    def client(base_url, token, **kwargs):
        return real(base_url, token, transport=httpx.MockTransport(handler))

    monkeypatch.setattr(service.client, "XsamClient", client)
    monkeypatch.setenv("XSAM_TOKEN", "t")
    return seen


def test_submit_prints_the_job_id(fake_api, tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text("model: {name: mlp}\ndata: {name: digits}\n")
    assert main(["submit", str(config), "--name", "x", "--tag", "a", "--tag", "b"]) == 0
    assert capsys.readouterr().out.strip() == "4"
    body = json.loads(fake_api[-1].content)
    assert body["name"] == "x" and body["tags"] == ["a", "b"]
    assert body["config"]["model"]["name"] == "mlp"


def test_list_status_metrics(fake_api, capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "epoch 2/3" in out
    assert main(["status", "4"]) == 0
    out = capsys.readouterr().out
    assert "train/loss" in out
    # The run environment of the latest attempt: versions, and the host of every rank.
    assert "(attempt 1) python 3.11.7, torch 2.13.0, ray 2.60.0; no GPU" in out
    assert "hosts     0:node-0, 1:node-1" in out
    assert main(["metrics", "4", "--csv"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "name,step,epoch,value", "train/loss,1,1,1.0", "train/loss,2,1,0.5",
    ]  # fmt: skip


def test_watch_follows_until_the_job_ends(fake_api, capsys):
    assert main(["watch", "4", "--interval", "0.01"]) == 0
    assert "job 4 succeeded" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        # the service refuses: one line with its detail and code
        (["cancel", "4"], 1, "already finished (job_finished, HTTP 409)"),
        (["status", "99"], 1, "not found"),
    ],
)
def test_errors_are_one_line(fake_api, capsys, argv, code, message):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_unreachable_service_is_one_line(capsys):
    assert main(["list", "--server", "http://127.0.0.1:9", "--token", "t"]) == 3
    err = capsys.readouterr().err.strip()
    assert err == "xsam list: cannot reach the XSAM service at http://127.0.0.1:9 (is `xsam serve` running?)"  # fmt: skip
