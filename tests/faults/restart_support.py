"""What the restart tests share: a job's events, the Ray processes that run ranks, the checks that
every logged step and every epoch was stored exactly once, and an `xsam agent` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from ray_support import ROOT, SERVICE_ENV

# tiny_config: 600 samples in batches of 50, a metric point every 2 steps.
STEPS_PER_EPOCH = 12
LOG_EVERY = 2


def events(api, job_id: int, type_: str | None = None) -> list[dict]:
    items, after = [], 0
    while True:
        page = api.events(job_id, after=after)
        items += page["items"]
        if not page["items"] or page.get("next_after") in (None, after):
            break
        after = page["next_after"]
    return [e for e in items if type_ is None or e["type"] == type_]


def epoch_reached(api, job_id: int, epoch: int):
    """A predicate: the job reported `epoch_done` for `epoch` (so its checkpoint is written)."""
    return lambda: any(e["data"]["epoch"] >= epoch for e in events(api, job_id, "epoch_done"))


def assert_every_step_once(api, job_id: int, epochs: int) -> None:
    """Every logged step and every epoch stored exactly once: none missing, none twice."""
    series = api.metrics(job_id)["series"]
    steps = [p["step"] for p in series["train/loss"]]
    assert steps == list(range(LOG_EVERY, epochs * STEPS_PER_EPOCH + 1, LOG_EVERY)), steps
    assert [p["epoch"] for p in series["test/acc"]] == list(range(1, epochs + 1))
    done = [e["data"]["epoch"] for e in events(api, job_id, "epoch_done")]
    assert done == list(range(1, epochs + 1)), done


def train_processes() -> list[tuple[int, str]]:
    """(pid, command line) of every Ray process that runs or controls a rank on this machine."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    rows = [line.strip().split(None, 1) for line in out.splitlines() if line.strip()]
    return [
        (int(pid), args)
        for pid, args in (r for r in rows if len(r) == 2)
        if args.startswith(
            ("ray::RayTrainWorker", "ray::TrainController", "ray::JobControl", "ray::WarmRank")
        )
    ]


class AgentProcess:
    """`xsam agent` against a server, joined to the session's Ray cluster (as `ray-head` runs it
    in the compose topology, beside an API of its own)."""

    def __init__(self, server: str, token: str, ray_address: str, data_dir: Path,
                 data_root: Path) -> None:  # fmt: skip
        self.log = data_dir / "agent.log"
        self.cmd = [
            sys.executable, "-m", "xsam", "agent", "--server", server, "--token", token,
            "--ray-address", ray_address, "--data-root", str(data_root),
            "--storage-path", str(data_dir / "checkpoints"),
            "--artifacts-dir", str(data_dir / "artifacts"), "--agent-id", "fault-test",
        ]  # fmt: skip
        self.process: subprocess.Popen | None = None

    def start(self) -> AgentProcess:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.cmd, cwd=ROOT, env={**os.environ, **SERVICE_ENV}, stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


class ApiProcess:
    """`xsam serve --no-agent`: the API alone (SQLite in `data_dir`), as compose's `api` runs it."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir, self.port = data_dir, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = data_dir / "api.log"
        self.process: subprocess.Popen | None = None

    @property
    def token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    def start(self, timeout: float = 120) -> ApiProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "xsam", "serve", "--no-agent", "--port", str(self.port),
            "--data-dir", str(self.data_dir), "--log-level", "warning",
        ]  # fmt: skip
        with self.log.open("ab") as out:
            offset = out.tell()  # a restart appends: look only at this start's lines
            self.process = subprocess.Popen(
                cmd, cwd=ROOT, env={**os.environ, **SERVICE_ENV}, stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            with self.log.open("rb") as f:
                f.seek(offset)
                if b"serving the API on" in f.read() and self._ready():
                    return self
            time.sleep(0.2)
        raise AssertionError(f"the API did not start:\n{self.log.read_text()[-3000:]}")

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
