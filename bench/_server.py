"""Start `xsam serve --no-agent` on a free loopback port for a benchmark (and stop it)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
ADMIN = "bench-admin-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(url: str, data_dir: Path, workers: int = 1) -> tuple[subprocess.Popen, str]:
    """(process, base URL) of a ready server on `url` with XSAM_ADMIN_TOKEN=ADMIN."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XSAM_")}
    env["XSAM_ADMIN_TOKEN"] = ADMIN
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--no-agent", "--port", str(port),
         "--data-dir", str(data_dir), "--database-url", url, "--log-level", "warning",
         "--workers", str(workers)],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                # With workers, give every process time to bind before measuring.
                time.sleep(1.0 if workers > 1 else 0)
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    stop_server(proc)
    raise TimeoutError("server did not become ready")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
