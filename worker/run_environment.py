"""What a rank runs on, recorded once per attempt and rank as an ``environment`` event.

``data``: ``{attempt, rank, host, xsam, git, python, torch, cuda, nccl, ray, gpu, gpus}``
(null where unknown: no git checkout, no CUDA). The job page and `xsam status` show the latest
attempt's. The event's key (``environment:<attempt>:<rank>``) makes a resend, or a worker group
Ray restarts within the attempt, a no-op.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

from service.contract import EventType

log = logging.getLogger(__name__)


def _git_revision() -> str | None:
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe(rank: int, attempt: int) -> dict[str, Any]:
    """This process's environment (torch is imported: ranks have it)."""
    import torch

    cuda = torch.cuda.is_available()
    nccl = None
    if cuda:
        try:
            nccl = ".".join(str(v) for v in torch.cuda.nccl.version())
        except Exception:  # a build without NCCL
            nccl = None
    return {
        "attempt": attempt,
        "rank": rank,
        "host": socket.gethostname(),
        "pid": os.getpid(),  # the rank's process on that host
        "xsam": _version("xsam-service"),
        "git": _git_revision(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "nccl": nccl,
        "ray": _version("ray"),
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "gpus": torch.cuda.device_count() if cuda else 0,
    }


def record_environment(client: Any, job_id: int, lease_token: str, attempt: int, rank: int) -> None:
    """Send this rank's environment as an event; never fails the run."""
    try:
        env = describe(rank, attempt)
        message = (f"rank {rank} on {env['host']}: python {env['python']}, torch {env['torch']}"
                   + (f", CUDA {env['cuda']}, {env['gpus']}× {env['gpu']}" if env["gpu"] else ""))  # fmt: skip
        event = {"type": EventType.ENVIRONMENT, "message": message, "data": env,
                 "key": f"environment:{attempt}:{rank}"}  # fmt: skip
        client.ingest_events(job_id, lease_token, [event])
    except Exception:
        log.warning("could not record the run environment", exc_info=True)
