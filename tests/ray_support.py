"""Fixtures for the end-to-end tests (tests/worker, tests/faults): ONE local Ray cluster per test
session, and real `xsam serve` processes (API + agent) that join it over real HTTP.

Registered for the whole session by tests/conftest.py (a fixture defined in two directories'
conftests would be two fixtures, and two Ray clusters). The imports of ray and fastapi are
deferred so that a machine without them still runs the other tests; the directories whose tests
need them skip in their own conftest.

The cluster is a private head node (worker.local_ray): free ports (Redis holds Ray's default
6379 on the CI machines), a short temp dir of its own, token authentication with a token file
of its own. 4 logical CPUs on a 2-core machine: the tiny MNIST-1D jobs here are mostly start-up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.client import XsamClient
from service.contract import JobPublic

ROOT = Path(__file__).resolve().parents[1]  # the repository (this file is tests/ray_support.py)
#: Short leases so that a killed server's job is requeued within seconds.
SERVICE_ENV = {
    "XSAM_HEARTBEAT_INTERVAL_S": "1",
    "XSAM_LEASE_TIMEOUT_S": "4",
    "XSAM_RETRY_BACKOFF_S": "0.5",
    "XSAM_REAPER_INTERVAL_S": "0.5",
    "OMP_NUM_THREADS": "1",
}


def tiny_config(**overrides) -> dict:
    """An XSAM job on MNIST-1D that trains in about a second per epoch on one core."""
    config = {
        "model": {"name": "cnn1d"},
        "data": {"name": "mnist1d", "batch_size": 50, "num_train": 600},
        "optimizer": {"name": "xsam", "lr": 0.05, "rho": 0.05},
        "schedule": {"epochs": 3},
        "resources": {"num_workers": 1},
        "log_every": 2,
        "seed": 0,
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            config[section] = {**config.get(section, {}), field: value}
        else:
            config[section] = value
    return config


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory) -> Iterator[Any]:
    pytest.importorskip("ray")
    from worker import local_ray

    temp_dir = Path(f"/tmp/ray-xt{os.getpid()}")
    token = local_ray.ensure_auth_token(tmp_path_factory.mktemp("ray") / "auth_token")
    head = local_ray.start_head(temp_dir, num_cpus=4, token_file=token)
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    # Generate MNIST-1D's cache once, so that no rank of any test pays for it.
    from xsam.data import load_dataset

    load_dataset("mnist1d", data_root=root)
    return root


class Serve:
    """One `xsam serve` process (API + agent) joined to the session's Ray cluster."""

    def __init__(
        self,
        data_dir: Path,
        port: int,
        ray_address: str,
        data_root: Path,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.data_dir, self.port = data_dir, port
        self.ray_address, self.data_root = ray_address, data_root
        # Extra `xsam serve` options (e.g. --database-url) and environment, for every start.
        self.args, self.env = tuple(args), dict(env or {})
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None
        self.log = data_dir / "serve.log"

    def start(self) -> Serve:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **SERVICE_ENV, **self.env}
        cmd = [
            sys.executable, "-m", "cli", "serve", "--port", str(self.port),
            "--data-dir", str(self.data_dir), "--ray-address", self.ray_address,
            "--data-root", str(self.data_root), *self.args,
        ]  # fmt: skip
        with self.log.open("ab") as out:
            offset = out.tell()  # a restart appends: look only at this start's lines
            self.process = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            with self.log.open("rb") as f:
                f.seek(offset)
                if b"agent running" in f.read():
                    return self
            time.sleep(0.3)
        raise AssertionError(f"xsam serve did not start:\n{self.log.read_text()[-3000:]}")

    @property
    def token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    def client(self) -> XsamClient:
        return XsamClient(self.url, self.token, timeout=30)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    @contextlib.contextmanager
    def api_only(self, timeout: float = 60) -> Iterator[XsamClient]:
        """`xsam serve --no-agent` on this (stopped) server's data dir and port: its queue as the
        next start will find it, with no agent to claim anything."""
        assert self.process is None or self.process.poll() is not None
        cmd = [
            sys.executable, "-m", "cli", "serve", "--no-agent", "--port", str(self.port),
            "--data-dir", str(self.data_dir), "--log-level", "warning",
        ]  # fmt: skip
        with self.log.open("ab") as out:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env={**os.environ, **SERVICE_ENV}, stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            with self.client() as api:
                deadline = time.monotonic() + timeout
                while not api.ready():
                    assert proc.poll() is None, self.log.read_text()[-3000:]
                    assert time.monotonic() < deadline, "xsam serve --no-agent did not start"
                    time.sleep(0.1)
                yield api
        finally:
            proc.terminate()
            proc.wait(30)

    def interrupt(self, timeout: float = 60) -> int:
        """Ctrl-C: SIGINT, then wait (bounded) for a clean exit; returns the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(
                f"xsam serve did not exit {timeout:.0f} s after SIGINT:\n"
                + self.log.read_text()[-3000:]
            ) from None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture(scope="session")
def serve_factory(ray_cluster, data_root, tmp_path_factory):
    started: list[Serve] = []

    from worker import local_ray

    def make(name: str, args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> Serve:
        port = local_ray.free_ports(1)[0]
        serve = Serve(
            tmp_path_factory.mktemp(name), port, ray_cluster.address, data_root, args, env
        )
        started.append(serve)
        return serve

    yield make
    for serve in started:
        serve.stop()


@pytest.fixture(scope="session")
def serve(serve_factory) -> Serve:
    """The session's shared service (API + agent)."""
    return serve_factory("serve").start()


@pytest.fixture
def api(serve) -> Iterator[XsamClient]:
    with serve.client() as client:
        yield client


def wait_for(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_terminal(
    api: XsamClient, job_id: int, timeout: float = 240, statuses: list[str] | None = None
) -> JobPublic:
    """The job once terminal; `statuses` (when given) gets each status it was seen in."""

    def seen(job: JobPublic) -> None:
        if statuses is not None and (not statuses or statuses[-1] != job.status):
            statuses.append(job.status)

    return api.wait_for_job(job_id, timeout=timeout, poll_s=0.5, on_poll=seen)


@pytest.fixture(name="tiny_config")
def _tiny_config_fixture():
    return tiny_config


@pytest.fixture(name="wait_terminal")
def _wait_terminal_fixture():
    return wait_terminal


@pytest.fixture(name="wait_for")
def _wait_for_fixture():
    return wait_for
