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
_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a live process has used itself, from /proc (0 once gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _tree(pid: int) -> list[int]:
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:
            continue
        for child in children:
            pids.extend(_tree(int(child)))
    return pids


def tree_cpu(pid: int) -> float:
    """CPU seconds used so far by a process and every live descendant (a server's workers)."""
    return sum(process_cpu(p) for p in _tree(pid))


def database_cpu(url: str) -> float:
    """CPU seconds used so far by the PostgreSQL instance serving `url` (it must run on this
    host): its processes, and the backends that have exited (the postmaster's reaped
    children), so a connection the pool closed mid-run still counts. The whole instance, other
    databases included: measure on a quiet machine. 0 for SQLite, whose work is in the API's
    processes."""
    if not url.startswith("postgresql"):
        return 0.0
    import psycopg

    dsn = url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(dsn, autocommit=True) as conn:
        (backend,) = conn.execute("SELECT pg_backend_pid()").fetchone() or (0,)
        postmaster = int(Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()[1])
    fields = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
    reaped = (int(fields[13]) + int(fields[14])) / _TICK
    return reaped + tree_cpu(postmaster)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(url: str, data_dir: Path, workers: int = 1) -> tuple[subprocess.Popen, str]:
    """(process, base URL) of a ready server on `url` with XSAM_ADMIN_TOKEN=ADMIN."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XSAM_")}
    env["XSAM_ADMIN_TOKEN"] = ADMIN
    # A bench seeds more jobs a minute than a user token may submit (60 by default).
    env["XSAM_SUBMIT_RATE_PER_MINUTE"] = "0"
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
