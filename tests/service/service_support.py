"""Fixtures of the service tests: every database test runs on SQLite and on PostgreSQL.

PostgreSQL tests get a fresh database per test, cloned from a migrated template made once per
session (fast); they skip when PostgreSQL is unreachable, unless XSAM_REQUIRE_POSTGRES=1.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.app import create_app
from service.db.migrate import upgrade
from service.settings import Settings

with warnings.catch_warnings():
    # starlette asks for httpx2 on import; the test client works with httpx.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

PG_HOST = os.environ.get("XSAM_TEST_PG_HOST", "127.0.0.1")
PG_ADMIN = f"host={PG_HOST} port=5432 user=postgres dbname=postgres"
ADMIN_SECRET = "test-admin-secret"
CONFIG: dict[str, Any] = {
    "model": {"name": "mlp"},
    "data": {"name": "digits"},
    "schedule": {"epochs": 2},
}


def pg_available() -> str | None:
    """None when PostgreSQL answers, else why not."""
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _pg_exec(*statements: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def pg_url(name: str) -> str:
    return f"postgresql+psycopg://postgres@{PG_HOST}:5432/{name}"


def create_pg_database(template: str | None = None) -> str:
    name = f"xsam_test_{secrets.token_hex(6)}"
    _pg_exec(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
    return name


def drop_pg_database(name: str) -> None:
    _pg_exec(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def _templates(tmp_path_factory) -> Iterator[dict[str, str]]:
    """Migrated template databases, made once: a SQLite file, and a PostgreSQL database."""
    made: dict[str, str] = {}
    sqlite_file = tmp_path_factory.mktemp("template") / "template.db"
    upgrade(f"sqlite:///{sqlite_file}")
    made["sqlite"] = str(sqlite_file)
    yield made
    if "postgres" in made:
        drop_pg_database(made["postgres"])


def _require_postgres() -> None:
    why = pg_available()
    if why is None:
        return
    if os.environ.get("XSAM_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PostgreSQL required (XSAM_REQUIRE_POSTGRES=1) but unreachable: {why}")
    pytest.skip(f"PostgreSQL unreachable at {PG_HOST}:5432: {why}")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, _templates, tmp_path) -> Iterator[str]:
    """A fresh, migrated database of each kind."""
    if request.param == "sqlite":
        target = tmp_path / "xsam.db"
        shutil.copyfile(_templates["sqlite"], target)
        yield f"sqlite:///{target}"
        return
    _require_postgres()
    if "postgres" not in _templates:
        template = create_pg_database()
        upgrade(pg_url(template))
        _templates["postgres"] = template
    name = create_pg_database(template=_templates["postgres"])
    try:
        yield pg_url(name)
    finally:
        drop_pg_database(name)


def make_settings(db_url: str, data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": db_url,
        "admin_token": ADMIN_SECRET,
        "heartbeat_interval_s": 0.2,
        "lease_timeout_s": 0.6,
        "retry_backoff_s": 0.0,
        "run_reaper": False,
        "db_pool_size": 10,
        "db_max_overflow": 10,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
def settings(db_url, tmp_path) -> Settings:
    return make_settings(db_url, tmp_path)


@pytest.fixture
def app(settings):
    return create_app(settings)


@pytest.fixture
def client(app) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


ADMIN = bearer(ADMIN_SECRET)


def new_token(client: TestClient, name: str, role: str = "user") -> dict[str, str]:
    r = client.post("/v1/tokens", json={"name": name, "role": role}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return bearer(r.json()["token"])


@pytest.fixture
def alice(client) -> dict[str, str]:
    return new_token(client, "alice")


@pytest.fixture
def bob(client) -> dict[str, str]:
    return new_token(client, "bob")


@pytest.fixture
def agent(client) -> dict[str, str]:
    return new_token(client, "agent-1", "agent")


def submit(client: TestClient, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    body.setdefault("config", CONFIG)
    r = client.post("/v1/jobs", json=body, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


def claim(
    client: TestClient,
    headers: dict[str, str],
    cpus: float = 4,
    gpus: int = 0,
    agent_id: str = "a1",
) -> dict[str, Any] | None:
    r = client.post(
        "/v1/agent/claim",
        json={"agent_id": agent_id, "capacity": {"cpus": cpus, "gpus": gpus}},
        headers=headers,
    )
    assert r.status_code in (200, 204), r.text
    return r.json() if r.status_code == 200 else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A real uvicorn server on a free loopback port, in a thread of this process."""

    def __init__(self, settings: Settings) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_ready(self.url)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def wait_ready(url: str, timeout: float = 30, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout}s")


@pytest.fixture
def live_server(settings) -> Iterator[LiveServer]:
    with LiveServer(settings) as server:
        yield server


def serve_subprocess(data_dir: Path, database_url: str, port: int, **env: str) -> subprocess.Popen:
    """`xsam serve --no-agent` as a child process (the real composition root)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("XSAM_")}
    environ.update(env)
    return subprocess.Popen(
        [
            sys.executable, "-m", "cli", "serve", "--no-agent", "--port", str(port),
            "--data-dir", str(data_dir), "--database-url", database_url, "--log-level", "warning",
        ],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
