"""Processes of the fault tests, started separately so that each can be killed on its own:
`xsam serve --no-agent` (the API) and `xsam agent` (with an agent token of its own) on the
session's Ray cluster. Every one is stopped, bounded, by the test that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from ray_support import ROOT, SERVICE_ENV, wait_for

from service.client import XsamClient


class Process:
    """A child process with its output in a log file; stopped (bounded) at the end."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str]) -> None:
        self.cmd, self.log, self.env = cmd, log, env
        self.proc: subprocess.Popen | None = None

    def start(self) -> Process:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 60) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


class Api(Process):
    """`xsam serve --no-agent` on ``data_dir`` and ``port`` (the database: XSAM_DATABASE_URL in
    ``env``, else SQLite in the data dir)."""

    def __init__(self, data_dir: Path, port: int, **env: str) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir, self.url = data_dir, f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable, "-m", "xsam", "serve", "--no-agent", "--port", str(port),
            "--data-dir", str(data_dir), "--log-level", "warning",
        ]  # fmt: skip
        super().__init__(cmd, data_dir / "api.log", {**os.environ, **SERVICE_ENV, **env})

    def start(self) -> Api:
        super().start()
        with XsamClient(self.url, "", timeout=30) as anonymous:
            wait_for(lambda: anonymous.ready() or not self.alive(), 120, what="the API")
        assert self.alive(), self.tail()
        return self

    @property
    def token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    def admin(self) -> XsamClient:
        return XsamClient(self.url, self.token, timeout=30)


def agent_for(api: Api, ray_address: str, data_root: Path, storage_path: Path) -> Process:
    """An `xsam agent` for ``api``'s jobs, with a fresh agent token (never the admin secret)."""
    with api.admin() as admin:
        token = admin.create_token(f"agent-{os.getpid()}-{id(api)}", role="agent")["token"]
    cmd = [
        sys.executable, "-m", "xsam", "agent", "--server", api.url, "--token", token,
        "--ray-address", ray_address, "--data-root", str(data_root),
        "--storage-path", str(storage_path), "--artifacts-dir", str(api.data_dir / "artifacts"),
        "--warm-actors", "1", "--log-level", "info",
    ]  # fmt: skip
    return Process(cmd, api.data_dir / "agent.log", api.env)


def events(api: XsamClient, job_id: int) -> list[dict]:
    items, after = [], 0
    while True:
        page = api.events(job_id, after=after)
        items += page["items"]
        if not page["items"] or page.get("next_after") in (None, after):
            return items
        after = page["next_after"]
