"""The CLI over real HTTP: this machine's admin secret goes only to its own server, and text
from the service is printed with its control characters escaped."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import httpx
import pytest
from service_support import ADMIN, ADMIN_SECRET, CONFIG, free_port

LOCAL_SECRET = "xsam_this-machines-admin-secret"


class Recorder(http.server.BaseHTTPRequestHandler):
    """A server that is not ours: records the Authorization header of every request."""

    seen: ClassVar[list[str]] = []

    def _any(self) -> None:
        Recorder.seen.append(self.headers.get("Authorization") or "")
        body = b'{"items": [], "next_cursor": null}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _any

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def foreign_server() -> Iterator[str]:
    # 127.0.0.2 is this machine too, but not the address `xsam serve` listens on: it stands
    # for another host.
    server = http.server.ThreadingHTTPServer(("127.0.0.2", free_port()), Recorder)
    Recorder.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.2:{server.server_address[1]}"
    server.shutdown()
    thread.join(5)


def xsam(*args: str, data_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("XSAM_")}
    environ.update({"XSAM_DATA_DIR": str(data_dir), **env})
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], env=environ, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize("stored", ["file", "env"])
@pytest.mark.parametrize("how", ["flag", "env"])
@pytest.mark.parametrize("command", [["list"], ["status", "1"], ["token", "list"], ["agent"]])
def test_the_local_admin_secret_is_not_sent_to_another_server(
    foreign_server, tmp_path, stored, how, command
):
    env: dict[str, str] = {}
    if stored == "file":
        (tmp_path / "admin.token").write_text(LOCAL_SECRET + "\n")
    else:
        env["XSAM_ADMIN_TOKEN"] = LOCAL_SECRET
    args = list(command)
    if how == "flag":
        args += ["--server", foreign_server]
    else:
        env["XSAM_SERVER"] = foreign_server
    done = xsam(*args, data_dir=tmp_path, **env)
    assert done.returncode == 2, done.stderr
    assert "XSAM_TOKEN" in done.stderr and foreign_server in done.stderr
    assert LOCAL_SECRET not in done.stderr + done.stdout
    assert Recorder.seen == []  # nothing at all was sent


def test_a_token_given_for_another_server_is_used(foreign_server, tmp_path):
    (tmp_path / "admin.token").write_text(LOCAL_SECRET + "\n")
    done = xsam("list", "--server", foreign_server, data_dir=tmp_path, XSAM_TOKEN="theirs")
    assert done.returncode == 0, done.stderr
    assert Recorder.seen == ["Bearer theirs"]


def test_the_local_secret_goes_only_to_the_port_its_server_runs_on(tmp_path, live_server):
    # A running `xsam serve` records its URL in its data directory; another loopback port
    # (someone else's server on this machine) does not get the secret.
    import fcntl

    (tmp_path / "admin.token").write_text(ADMIN_SECRET + "\n")
    record = tmp_path / "serve.lock"
    record.write_text(f'{{"pid": 1, "url": "{live_server.url}"}}')
    elsewhere = f"http://127.0.0.1:{free_port()}"
    # Not held (the server that wrote it was killed): the record is stale, loopback is ours.
    stale = xsam("list", "--server", elsewhere, data_dir=tmp_path)
    assert "XSAM_TOKEN" not in stale.stderr
    with record.open() as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as the running `xsam serve` holds it
        ok = xsam("list", "--server", live_server.url.replace("127.0.0.1", "localhost"),
                  data_dir=tmp_path)  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        other = xsam("list", "--server", elsewhere, data_dir=tmp_path)
        assert other.returncode == 2 and "XSAM_TOKEN" in other.stderr


NASTY = "\x1b[2J\x1b]0;owned\x07\x1b[31mred\u202e"


def test_cli_output_escapes_control_characters(live_server, tmp_path):
    url = live_server.url
    job = httpx.post(
        f"{url}/v1/jobs", json={"config": CONFIG, "name": f"n{NASTY}"}, headers=ADMIN
    ).json()
    claim = {"agent_id": "a1", "capacity": {"cpus": 4, "gpus": 0}}
    lease = httpx.post(f"{url}/v1/agent/claim", json=claim, headers=ADMIN).json()["lease"]
    finish = {
        "lease_token": lease["lease_token"],
        "status": "failed",
        "error": {"type": f"t{NASTY}", "message": f"m{NASTY}\nsecond line"},
    }
    r = httpx.post(f"{url}/v1/agent/jobs/{job['id']}/finish", json=finish, headers=ADMIN)
    assert r.status_code == 200, r.text
    env = {"XSAM_SERVER": url, "XSAM_TOKEN": ADMIN_SECRET}
    for args in (["list"], ["status", str(job["id"])], ["watch", str(job["id"])]):
        done = xsam(*args, data_dir=tmp_path, **env)
        out = done.stdout + done.stderr
        assert done.returncode in (0, 1), out
        assert "\\x1b[31mred" in out, (args, out)  # shown, escaped
        for raw in ("\x1b", "\x07", "\u202e"):
            assert raw not in out, (args, out)
    # --json is JSON: its escapes are JSON's own.
    done = xsam("status", "--json", str(job["id"]), data_dir=tmp_path, **env)
    assert "\\u001b[31mred" in done.stdout and "\x1b" not in done.stdout
