"""The OpenAPI document declares the bearer scheme and every error response; SQL parameters
never reach an error message or a log; the data directory is its owner's alone."""

from __future__ import annotations

import logging
import stat
import subprocess

import httpx
import pytest
from service_support import free_port, serve_subprocess, wait_ready
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from service.db.engine import make_engine

SECRET = "lease-token-3f9a0c-must-not-leak"


def test_openapi_declares_bearer_auth_and_the_error_bodies(live_server):
    doc = httpx.get(f"{live_server.url}/openapi.json").json()
    assert {"type": "http", "scheme": "bearer"}.items() <= doc["components"]["securitySchemes"][
        "HTTPBearer"
    ].items()
    error_ref = "#/components/schemas/ErrorPublic"
    operations = [
        (path, method, op)
        for path, item in doc["paths"].items()
        if path.startswith("/v1/")
        for method, op in item.items()
    ]
    assert len(operations) >= 15
    for path, method, op in operations:
        assert op.get("security") == [{"HTTPBearer": []}], (method, path)
        responses = op["responses"]
        for status in ("401", "422", "503"):
            assert status in responses, (method, path, status)
        schema = responses["401"]["content"]["application/json"]["schema"]
        assert schema == {"$ref": error_ref}, (method, path)
        body_422 = responses["422"]["content"]["application/json"]["schema"]["$ref"]
        assert body_422.endswith("/ValidationErrorPublic")
    submit = doc["paths"]["/v1/jobs"]["post"]["responses"]
    assert {"200", "201", "400", "403", "409", "413", "422", "429"} <= set(submit)
    assert "404" in doc["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]
    assert "409" in doc["paths"]["/v1/jobs/{job_id}/cancel"]["post"]["responses"]
    assert "409" in doc["paths"]["/v1/tokens"]["post"]["responses"]
    assert "404" in doc["paths"]["/v1/tokens/{token_id}"]["delete"]["responses"]
    assert "409" in doc["paths"]["/v1/agent/jobs/{job_id}/heartbeat"]["post"]["responses"]
    assert {"code", "detail"} <= set(doc["components"]["schemas"]["ErrorPublic"]["properties"])


def test_sql_parameters_are_never_in_errors_or_logs(db_url, caplog):
    engine = make_engine(db_url)
    caplog.set_level(logging.DEBUG)
    try:
        with engine.connect() as conn, pytest.raises(DBAPIError) as info:
            conn.execute(
                text("SELECT * FROM jobs WHERE lease_token = :t AND nope = 1"), {"t": SECRET}
            )
    finally:
        engine.dispose()
    assert SECRET not in str(info.value)
    assert "hidden due to hide_parameters" in str(info.value)
    assert SECRET not in caplog.text


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_data_directory_is_owner_only(db_url, tmp_path):
    data_dir = tmp_path / "state"
    data_dir.mkdir(mode=0o755)  # as an older install left it
    data_dir.chmod(0o755)
    url = f"sqlite:///{data_dir / 'xsam.db'}" if db_url.startswith("sqlite") else db_url
    port = free_port()
    proc = serve_subprocess(data_dir, url, port)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc=proc)
        assert mode(data_dir) == 0o700
        for name in ("admin.token", "serve.lock"):
            assert mode(data_dir / name) == 0o600, name
        if db_url.startswith("sqlite"):
            for path in data_dir.glob("xsam.db*"):
                assert mode(path) == 0o600, path
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
