"""One `xsam serve` per data directory and per port (real processes, SQLite and PostgreSQL):
a second one exits at once, naming the first, and never runs beside it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
from service_support import free_port, serve_subprocess, wait_ready


def finished(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"the second server kept running: {out.decode()}") from None
    return proc.returncode, out.decode()


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_a_second_serve_on_the_same_data_directory_exits(db_url, tmp_path):
    data_dir, port = tmp_path / "state", free_port()
    first = serve_subprocess(data_dir, db_url, port)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc=first)
        record = json.loads((data_dir / "serve.lock").read_text())
        assert record == {"pid": first.pid, "url": f"http://127.0.0.1:{port}"}
        second = serve_subprocess(data_dir, db_url, free_port())
        code, out = finished(second)
        assert code == 1, out
        assert f"pid {first.pid}" in out and f"http://127.0.0.1:{port}" in out
        assert str(data_dir) in out and "serving the API" not in out
        # The first is untouched, and still the one its record names.
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
        assert json.loads((data_dir / "serve.lock").read_text())["pid"] == first.pid
    finally:
        stop(first)
    # Stopped (its lock goes with the process), it leaves the directory to the next one.
    again = serve_subprocess(data_dir, db_url, port)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc=again)
    finally:
        stop(again)


def test_a_second_serve_on_the_same_port_exits_before_doing_anything(db_url, tmp_path):
    port = free_port()
    first = serve_subprocess(tmp_path / "one", db_url, port)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc=first)
        second = serve_subprocess(tmp_path / "two", db_url, port)
        code, out = finished(second)
        assert code == 1, out
        assert f"127.0.0.1:{port}" in out and "XSAM training service" in out
        assert "serving the API" not in out
        assert not (tmp_path / "two" / "admin.token").exists()  # nothing was provisioned
    finally:
        stop(first)


def test_an_embedded_serve_on_a_busy_port_starts_no_ray_and_no_agent(db_url, tmp_path):
    # Was: the bind failed, yet it printed "serving", started Ray and an agent that claimed
    # jobs from the first server's API. Now it exits before any of that.
    port = free_port()
    first = serve_subprocess(tmp_path / "one", db_url, port)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc=first)
        environ = {k: v for k, v in os.environ.items() if not k.startswith("XSAM_")}
        started = time.monotonic()
        second = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--port", str(port),
             "--data-dir", str(tmp_path / "two"), "--database-url", db_url,
             "--ray-temp-dir", str(tmp_path / "ray"), "--num-cpus", "1"],
            env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        code, out = finished(second)
        assert code == 1, out
        assert f"127.0.0.1:{port}" in out
        assert "Ray" not in out and "agent" not in out and "serving the API" not in out
        assert time.monotonic() - started < 30
    finally:
        stop(first)
