"""Session-wide test settings and the session's Ray/serve fixtures (tests/ray_support.py). Other
area fixtures live in tests/<area>/conftest.py."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest

# The session-wide Ray cluster and `xsam serve` fixtures of tests/worker and tests/faults.
from ray_support import (  # noqa: F401
    _tiny_config_fixture,
    _wait_for_fixture,
    _wait_terminal_fixture,
    api,
    data_root,
    ray_cluster,
    serve,
    serve_factory,
)

#: Inherited by every process the tests start (servers, Ray daemons, spawned ranks), so that the
#: session can find and kill whatever is left at its end, even daemons that left our tree.
SESSION_MARK = "XSAM_TEST_SESSION"
os.environ.setdefault(SESSION_MARK, uuid.uuid4().hex)  # scripts/stress.sh sets its own

# Keep every Ray process the tests start (and their children) on 127.0.0.1: without this Ray
# resolves "127.0.0.1" to the machine's own interface address and talks over it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _one_torch_thread_per_test():
    # Two cores per machine: keep each test's intra-op threads bounded and deterministic.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    yield


def _ancestors() -> set[int]:
    """This process and the ones above it (a launcher such as scripts/stress.sh may share the
    mark: it must not be killed)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the command is state
    return pids


def _session_processes() -> list[int]:
    """Processes other than this one and its ancestors whose environment carries this
    session's mark."""
    mark = f"{SESSION_MARK}={os.environ[SESSION_MARK]}".encode()
    keep = _ancestors()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in keep:
            continue
        with contextlib.suppress(OSError):
            if mark in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="session", autouse=True)
def _reap_leftover_processes():
    """After the last test (pass, fail, timeout or Ctrl-C): nothing the tests started survives."""
    yield
    if not Path("/proc").is_dir():
        return
    leftover = _session_processes()
    for pid in leftover:  # on the real stderr: pytest's capture has ended for the session
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
            print(f"tests left process {pid} running; killing it: {cmd}", file=sys.__stderr__)
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        for pid in leftover:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while leftover and time.monotonic() < deadline:
            time.sleep(0.1)
            leftover = [pid for pid in leftover if Path(f"/proc/{pid}").exists()]
