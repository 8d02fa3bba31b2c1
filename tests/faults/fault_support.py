"""What the fault tests share: the processes they start separately so that each can be killed on
its own (`xsam serve --no-agent`, the API, and `xsam agent` with an agent token of its own, on
the session's Ray cluster), a job's events, the Ray processes that run ranks, and the checks that
every logged step and every epoch was stored exactly once.

Every process is stopped, bounded (SIGTERM, then SIGKILL), by the test that started it; every
wait here has a deadline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from ray_support import ROOT, SERVICE_ENV, wait_for

from service.client import XsamClient
from service.contract import EventPublic

# tiny_config: 600 samples in batches of 50, a metric point every 2 steps.
STEPS_PER_EPOCH = 12
LOG_EVERY = 2


class Process:
    """A child process with its output appended to a log file; stopped (bounded) at the end."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str]) -> None:
        self.cmd, self.log, self.env = cmd, log, env
        self.proc: subprocess.Popen | None = None

    def start(self) -> Process:
        assert not self.alive(), "already running"
        with self.log.open("ab") as out:  # a restart appends to the same log
            self.proc = subprocess.Popen(
                self.cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash would; reaped before returning."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM and wait, then SIGKILL; a no-op when it is not running."""
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
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


class Api(Process):
    """`xsam serve --no-agent` on ``data_dir`` and ``port`` (the database: XSAM_DATABASE_URL in
    ``env``, else SQLite in the data dir), as compose's `api` runs it. ``start`` returns once it
    answers /readyz, and may be called again after ``kill`` (same port, same database)."""

    def __init__(self, data_dir: Path, port: int, **env: str) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir, self.url = data_dir, f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable, "-m", "cli", "serve", "--no-agent", "--port", str(port),
            "--data-dir", str(data_dir), "--log-level", "warning",
        ]  # fmt: skip
        super().__init__(cmd, data_dir / "api.log", {**os.environ, **SERVICE_ENV, **env})

    def start(self, timeout: float = 120) -> Api:
        super().start()
        try:
            with XsamClient(self.url, "", timeout=30) as anonymous:
                wait_for(lambda: not self.alive() or anonymous.ready(), timeout, what="the API")
            assert self.alive(), f"the API exited:\n{self.tail()}"
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    def admin(self) -> XsamClient:
        return XsamClient(self.url, self.token, timeout=30)


def agent_for(
    api: Api, ray_address: str, data_root: Path, storage_path: Path, agent_id: str = "fault-test"
) -> Process:
    """An `xsam agent` for ``api``'s jobs on the Ray cluster at ``ray_address`` (as `ray-head`
    runs it in the compose topology), with a fresh agent token (never the admin secret)."""
    with api.admin() as admin:
        token = admin.create_token(f"agent-{os.getpid()}-{id(api)}", role="agent").token
    cmd = [
        sys.executable, "-m", "cli", "agent", "--server", api.url, "--token", token,
        "--ray-address", ray_address, "--data-root", str(data_root),
        "--storage-path", str(storage_path), "--artifacts-dir", str(api.data_dir / "artifacts"),
        "--agent-id", agent_id, "--warm-actors", "1", "--log-level", "info",
    ]  # fmt: skip
    return Process(cmd, api.data_dir / "agent.log", api.env)


def events(api: XsamClient, job_id: int, type_: str | None = None) -> list[EventPublic]:
    """Every event of the job so far (of ``type_`` only, when given), across pages."""
    items: list[EventPublic] = []
    after = 0
    while True:
        page = api.events(job_id, after=after, type=type_)
        items += page.items
        if not page.items or page.next_after == after:
            return items
        after = page.next_after


def epoch_reached(api: XsamClient, job_id: int, epoch: int) -> Callable[[], bool]:
    """A predicate: the job reported `epoch_done` for `epoch` (so its checkpoint is written)."""
    return lambda: any(
        (e.data or {}).get("epoch", 0) >= epoch for e in events(api, job_id, "epoch_done")
    )


def assert_every_step_once(api: XsamClient, job_id: int, epochs: int) -> None:
    """Every logged step and every epoch stored exactly once: none missing, none twice."""
    series = api.metrics(job_id).series
    steps = [p.step for p in series["train/loss"]]
    assert steps == list(range(LOG_EVERY, epochs * STEPS_PER_EPOCH + 1, LOG_EVERY)), steps
    assert [p.epoch for p in series["test/acc"]] == list(range(1, epochs + 1))
    done = [e.data["epoch"] for e in events(api, job_id, "epoch_done") if e.data]
    assert done == list(range(1, epochs + 1)), done


def train_processes() -> list[tuple[int, str]]:
    """(pid, command line) of every Ray process that runs or controls a rank on this machine."""
    out = subprocess.run(
        ["ps", "-eo", "pid=,args="], capture_output=True, text=True, timeout=30
    ).stdout
    rows = [line.strip().split(None, 1) for line in out.splitlines() if line.strip()]
    return [
        (int(pid), args)
        for pid, args in (r for r in rows if len(r) == 2)
        if args.startswith(
            ("ray::RayTrainWorker", "ray::TrainController", "ray::JobControl", "ray::WarmRank")
        )
    ]
