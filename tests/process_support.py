"""Child processes that tests start, always reaped: spawned DDP ranks and their deadlines.

A test that starts processes must fail in seconds when they hang, and must never leave them
running: `run_ranks` joins spawned ranks against a deadline and kills every one still alive when
the test fails, times out (pytest-timeout's signal raises in the joining thread) or passes. Each
child also asks the kernel to kill it when the test process dies (PR_SET_PDEATHSIG), so not even a
SIGKILLed pytest leaves ranks behind.
"""

from __future__ import annotations

import ctypes
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent exits (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _rank_main(rank: int, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    die_with_parent()
    fn(rank, *args)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(
    fn: Callable[..., None], args: tuple[Any, ...], nprocs: int, timeout_s: float
) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes and wait for all to exit 0.

    Raises (after killing every rank still alive) if a rank raises or exits non-zero, or if any
    is still running after ``timeout_s`` — a hang at exit counts as a failure, with the pids and
    exit codes in the message.
    """
    context = mp.start_processes(
        _rank_main, args=(fn, args), nprocs=nprocs, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=0.2):
            if time.monotonic() > deadline:
                states = [
                    f"rank {r}: pid {p.pid}, "
                    + ("running" if p.is_alive() else f"exit code {p.exitcode}")
                    for r, p in enumerate(context.processes)
                ]
                raise AssertionError(
                    f"ranks not done after {timeout_s:g} s (a hang): " + "; ".join(states)
                )
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(5)
