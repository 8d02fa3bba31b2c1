"""A PostgreSQL cluster of the test's own (`initdb` + `pg_ctl` on a free loopback port, in a
temporary directory), so that a test may stop and restart it: never the machine's shared
PostgreSQL on 5432, which serves other tests and people.

Trust authentication, fsync off, its unix socket in its own directory. initdb refuses to run as
root: then every PostgreSQL command runs as the `postgres` OS user (`runuser -u postgres --`) in
a directory that user owns. Missing binaries (or no such user) skip the test with the reason,
unless XSAM_REQUIRE_POSTGRES=1 (as in CI), where they fail it. Every command is bounded, and the
cluster is stopped and deleted afterwards whatever happened (the `postgres` fixture in
tests/faults/conftest.py).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from process_support import free_port


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


class ThrowawayPostgres:
    """One PostgreSQL cluster in `root`, listening on 127.0.0.1:`port` with trust auth."""

    def __init__(self, bin_dir: Path, root: Path, as_user: str | None) -> None:
        self.bin_dir, self.root, self.as_user = bin_dir, root, as_user
        self.data = root / "data"
        self.log = root / "postgres.log"
        self.port = free_port()
        #: SQLAlchemy URL of its `postgres` database (XSAM_DATABASE_URL, --database-url).
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str, timeout: float = 120) -> None:
        cmd = [str(self.bin_dir / tool), *args]
        if self.as_user:
            cmd = ["runuser", "-u", self.as_user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(
                f"{tool} failed ({done.returncode}): {done.stdout}{done.stderr}\n"
                + (self.log.read_text(errors="replace")[-2000:] if self.log.exists() else "")
            )

    def init(self) -> ThrowawayPostgres:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "-E", "UTF8", "--no-sync")  # fmt: skip
        return self

    def start(self) -> None:
        """Start (again) on the same port; returns once it accepts connections (≤ 60 s)."""
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c full_page_writes=off"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
                  "-t", "60", "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """Stop, as an operator would (fast: every connection is closed at once)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self) -> None:
        """Stop (fast) and start again on the same port: every pooled connection is dropped."""
        self.stop()
        self.start()

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def teardown(self) -> None:
        """Stop at once if running, never raising: for the end of a test, whatever happened."""
        if self.running():
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                self.stop("immediate")


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[ThrowawayPostgres]:
    """A started cluster, stopped and deleted afterwards whatever happened (a failed start
    included)."""
    bin_dir = _bin_dir()
    as_user = "postgres" if os.geteuid() == 0 else None  # initdb refuses root
    reason = None
    if bin_dir is None or not (bin_dir / "pg_ctl").exists():
        reason = "initdb/pg_ctl not found (PostgreSQL's server binaries are not installed)"
    elif as_user and not _has_user(as_user):
        reason = "running as root, and there is no `postgres` OS user to run initdb as"
    elif as_user and shutil.which("runuser") is None:
        reason = "running as root, and there is no `runuser` to run initdb as `postgres` with"
    if reason:
        if os.environ.get("XSAM_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"a private PostgreSQL is required but cannot run: {reason}")
        pytest.skip(f"a private PostgreSQL cannot run here: {reason}")
    assert bin_dir is not None
    # Under /tmp (not pytest's 0700 tmp dir), so that the `postgres` account can reach it.
    root = Path(tempfile.mkdtemp(prefix="xsam-pg-"))
    try:
        if as_user:
            entry = pwd.getpwnam(as_user)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        cluster = ThrowawayPostgres(bin_dir, root, as_user)
        try:
            cluster.init().start()
            yield cluster
        finally:
            cluster.teardown()
    finally:
        shutil.rmtree(root, ignore_errors=True)
