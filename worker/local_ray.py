"""A private local Ray head node for `xsam serve` and the tests: own ports, own temp dir, a token.

Ray's defaults collide on a shared machine (GCS on 6379 — Redis's port —, the client server on
10001, the dashboard agent on 52365) and its token lives in ~/.ray. Here every port is picked
free, the temp dir and the auth token file belong to the caller, and the head runs as
``ray start --head --block`` in a child process that dies with its parent (Linux
``PR_SET_PDEATHSIG``), so even a SIGKILLed `xsam serve` leaves no Ray cluster behind. The child
runs in a session of its own: a terminal's Ctrl-C (SIGINT to the foreground process group) reaches
only `xsam serve`, which stops the jobs with a checkpoint first and the head last, instead of
reaching Ray's processes too and killing the jobs' ranks mid-step.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

#: Ray's token auth reads these (see ray/_private/authentication).
AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that are free on 127.0.0.1 right now."""
    sockets, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def ensure_auth_token(path: Path) -> Path:
    """Create a Ray auth token file (mode 0600) at ``path`` unless one exists."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


def use_auth_token(path: Path) -> None:
    """Make this process (and its children: Ray drivers, workers) authenticate with ``path``."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class LocalRay:
    """A running head node started by `start_head`; `stop()` ends it and everything it ran."""

    address: str
    temp_dir: Path
    process: subprocess.Popen
    log_file: Path
    ports: dict[str, int] = field(default_factory=dict)

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is not None:
            return
        # `ray start --block` stops the processes it started when it is terminated.
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def start_head(
    temp_dir: str | Path,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    token_file: str | Path | None = None,
    object_store_mb: int = 300,
    timeout: float = 120.0,
) -> LocalRay:
    """Start ``ray start --head --block`` on 127.0.0.1 with explicit free ports.

    ``temp_dir`` should be short (Ray puts unix sockets under it; their paths are limited to
    107 bytes). With ``token_file`` the cluster uses token authentication with that token and
    this process is set up to use it too.
    """
    temp_dir = Path(temp_dir)
    temp_dir.mkdir(parents=True, exist_ok=True)
    names = [
        "port",
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
    ]
    # Worker processes get a 1000-port window; the fixed ports are picked outside it.
    low = 20000 + 1000 * (os.getpid() % 20)
    chosen = [p for p in free_ports(3 * len(names)) if not low <= p < low + 1000]
    ports = dict(zip(names, chosen[: len(names)], strict=True))
    # A local head is for this machine only: keep Ray (and this driver, which connects next) on
    # 127.0.0.1 instead of letting it resolve loopback to the host's interface address.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    env = dict(os.environ)
    if token_file is not None:
        use_auth_token(Path(token_file))
        env.update({k: os.environ[k] for k in AUTH_ENV})
    else:
        env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Our jobs are stopped before the head is; no need for its default 30 s drain.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "3")
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    cmd = [
        ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}", "--include-dashboard=false", "--disable-usage-stats",
        f"--object-store-memory={object_store_mb * 1024 * 1024}",
        # A port range for worker processes, clear of the fixed ports above.
        f"--min-worker-port={low}", f"--max-worker-port={low + 999}",
        *(f"--{name}={port}" for name, port in ports.items()),
    ]  # fmt: skip
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    log_file = temp_dir / "ray-start.log"
    with log_file.open("ab") as out:
        process = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # out of the terminal's process group: see the docstring
            preexec_fn=_die_with_parent,
        )
    address = f"127.0.0.1:{ports['port']}"
    head = LocalRay(address, temp_dir, process, log_file, ports)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}; see {log_file}")
        if _gcs_up(ports["port"]) and "Ray runtime started" in log_file.read_text(errors="replace"):
            log.info("local Ray head at %s (temp dir %s)", address, temp_dir)
            return head
        time.sleep(0.5)
    head.stop()
    raise RuntimeError(f"ray start did not come up in {timeout:.0f} s; see {log_file}")


def _gcs_up(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0
