"""A PostgreSQL server of the test's own, so that a test may stop and restart it.

The shared server at 127.0.0.1:5432 serves other tests and people: it is never restarted. This
one is a fresh cluster (initdb) in a temporary directory, on a free loopback port, with no unix
socket, trust authentication and fsync off. PostgreSQL refuses to run as root, so when the tests
run as root the server runs as the `postgres` account (runuser); the test skips with the reason
when neither works, unless XSAM_REQUIRE_POSTGRES=1.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

_BIN_DIRS = [Path(p) for p in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)]


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in _BIN_DIRS:
        if (directory / name).is_file():
            return str(directory / name)
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivatePostgres:
    def __init__(self) -> None:
        self.initdb, self.pg_ctl = _binary("initdb"), _binary("pg_ctl")
        if self.initdb is None or self.pg_ctl is None:
            self._unavailable("initdb/pg_ctl not found")
        self.runas: list[str] = []
        self.owner: int | None = None
        if os.geteuid() == 0:
            try:
                self.owner = pwd.getpwnam("postgres").pw_uid
            except KeyError:
                self._unavailable("running as root and there is no `postgres` account")
            self.runas = ["runuser", "-u", "postgres", "--"]
        # Under /tmp (not pytest's 0700 tmp dir), so that the `postgres` account can reach it.
        self.root = Path(tempfile.mkdtemp(prefix="xsam-pg-"))
        self.root.chmod(0o755)
        self.data = self.root / "data"
        self.logfile = self.root / "server.log"
        self.port = free_port()

    @staticmethod
    def _unavailable(why: str) -> None:
        if os.environ.get("XSAM_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"a private PostgreSQL is required but cannot run: {why}")
        pytest.skip(f"a private PostgreSQL cannot run here: {why}")

    def _run(self, *args: str, timeout: float = 60) -> None:
        result = subprocess.run(
            [*self.runas, *args], capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            log = self.logfile.read_text()[-2000:] if self.logfile.exists() else ""
            raise AssertionError(f"{args[0]} failed: {result.stdout}{result.stderr}\n{log}")

    def create(self) -> PrivatePostgres:
        if self.owner is not None:
            os.chown(self.root, self.owner, -1)
        self._run(self.initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E",
                  "UTF8", "--no-sync")  # fmt: skip
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                "unix_socket_directories = ''\nfsync = off\nfull_page_writes = off\n"
                "max_connections = 100\n"
            )
        return self

    def start(self) -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60",
                  "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self) -> None:
        """Stop (fast: every connection is closed) and start again, as an operator would."""
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.logfile), "-m", "fast", "-w",
                  "-t", "60", "restart")  # fmt: skip

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(
                [*self.runas, self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"],
                capture_output=True, timeout=60,
            )  # fmt: skip
        shutil.rmtree(self.root, ignore_errors=True)
