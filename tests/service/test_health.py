"""The probes and the app's own answers: /healthz, /readyz (503 without a database), the
Prometheus /metrics, and a code on the 404 of an unknown route."""

from __future__ import annotations

from service_support import TestClient, make_settings, submit


def test_health_ready_and_prometheus(client, alice):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    submit(client, alice)
    submit(client, alice)
    text = client.get("/metrics").text
    assert 'xsam_jobs{status="queued"} 2.0' in text
    assert "xsam_queue_depth 2.0" in text
    assert (
        'xsam_http_request_duration_seconds_count{method="POST",route="/v1/jobs",status="201"} 2.0'
        in text
    )


def test_readyz_is_503_without_a_database(tmp_path):

    from service.app import create_app

    url = "postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=1"
    with TestClient(create_app(make_settings(url, tmp_path))) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["code"] == "database_unreachable"
        assert client.get("/healthz").status_code == 200


def test_unknown_route_has_a_code(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["code"] == "not_found"
