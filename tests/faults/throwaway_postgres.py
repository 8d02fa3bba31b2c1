"""A PostgreSQL cluster of the test's own (`initdb` + `pg_ctl` on a free port, in a tmp dir), so
that a test may restart it: never the machine's shared PostgreSQL on 5432.

initdb refuses to run as root: then every PostgreSQL command runs as the `postgres` OS user
(`runuser -u postgres --`) in a directory that user owns. Missing binaries skip the test with the
reason, unless XSAM_REQUIRE_POSTGRES=1 (as in CI), where they fail it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if found:
        return Path(found[0]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ThrowawayPostgres:
    """One PostgreSQL cluster in `root`, listening on 127.0.0.1:`port` with trust auth."""

    def __init__(self, bin_dir: Path, root: Path, as_user: str | None) -> None:
        self.bin_dir, self.root, self.as_user = bin_dir, root, as_user
        self.data = root / "data"
        self.log = root / "postgres.log"
        self.port = _free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str, timeout: float = 120) -> None:
        cmd = [str(self.bin_dir / tool), *args]
        if self.as_user:
            cmd = ["runuser", "-u", self.as_user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(
                f"{tool} failed ({done.returncode}): {done.stdout}{done.stderr}\n"
                + (self.log.read_text()[-2000:] if self.log.exists() else "")
            )

    def init(self) -> ThrowawayPostgres:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "-E", "UTF8", "--no-sync")  # fmt: skip
        return self

    def start(self) -> None:
        # Unix sockets in the cluster's own dir (the default dir may not be writable for us).
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
                  "-t", "60", "start")  # fmt: skip

    def restart(self) -> None:
        """Stop (fast: every connection is closed at once) and start again on the same port."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        self.start()

    def stop(self) -> None:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=30)


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[ThrowawayPostgres]:
    """A started cluster, stopped and deleted afterwards whatever happened."""
    bin_dir = _bin_dir()
    as_user = "postgres" if os.geteuid() == 0 else None  # initdb refuses root
    reason = None
    if bin_dir is None:
        reason = "initdb not found (PostgreSQL's server binaries are not installed)"
    elif as_user and not _has_user(as_user):
        reason = "running as root, and there is no `postgres` OS user to run initdb as"
    if reason:
        if os.environ.get("XSAM_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{reason}; XSAM_REQUIRE_POSTGRES=1")
        pytest.skip(reason)
    assert bin_dir is not None
    root = Path(tempfile.mkdtemp(prefix="xsam-pg-"))
    if as_user:
        entry = pwd.getpwnam(as_user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    cluster = ThrowawayPostgres(bin_dir, root, as_user)
    try:
        cluster.init().start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
