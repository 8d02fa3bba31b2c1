"""Warm actors for one-rank jobs: a small pool of long-lived Ray actors, reused across jobs.

A fresh `TorchTrainer` costs a one-rank job ~15 s before fit() starts (controller, worker group,
process group, imports), most of a small job. A one-rank CPU job needs none of that: a
`WarmRank` actor — its process started and torch, fit and the client imported once — runs
`worker.rank.run_rank` (the very code every Ray Train rank runs: fit, the stop flag, rank 0's
reporter, the outcome in the control actor) and is then handed back to the pool for the next
job. Multi-rank and GPU jobs keep `TorchTrainer`.

Resources: a warm actor reserves no Ray CPU (``num_cpus=0``), so an idle one never blocks a
multi-rank job's placement group; the agent counts a running one-rank job's CPUs against its
capacity as it does for every run (`Agent.capacity`), and the actor sets torch's thread count
to the job's ``cpus_per_worker``.

Failures (docs/agent.md, "Failures"): an actor whose process dies is discarded and the job is
run again in another actor within the same attempt, up to the agent's ``--max-failures``
(as Ray Train restarts a worker group), resuming from ``checkpoint.pt``; past that the attempt
ends as an infrastructure failure and the job is requeued as its next attempt.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import ray

from worker.control import NAMESPACE

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)
class WarmRank:
    """A process that runs one-rank jobs, one at a time."""

    def ready(self) -> int:
        # Pay the imports before the first job: torch alone is seconds on a loaded machine.
        import service.client  # noqa: F401
        import worker.reporter  # noqa: F401
        import xsam.training  # noqa: F401

        return os.getpid()

    def run(self, spec: dict[str, Any], cpus: float) -> dict[str, Any] | None:
        import torch

        from worker.rank import run_rank

        torch.set_num_threads(max(1, int(cpus)))
        return run_rank(spec, rank=0, device="cpu")


class WarmPool:
    """Idle `WarmRank` actors, at most ``size`` kept; `take` creates one when none is idle."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False

    def _create(self) -> Any:
        # (mypy keeps a class's own type under a class decorator: it cannot see ray.remote's
        # ActorClass, whose `options` this is.)
        actor = WarmRank.options(namespace=NAMESPACE).remote()  # type: ignore[attr-defined]
        actor.ready.remote()  # starts the imports now; calls on an actor run in order
        return actor

    def prewarm(self, count: int = 1) -> None:
        """Start ``count`` actors now, so the first job does not wait for a process."""
        with self._lock:
            while len(self._idle) < min(count, self.size):
                self._idle.append(self._create())

    def take(self) -> Any:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._create()

    def give_back(self, actor: Any) -> None:
        """Return an actor whose job has ended (its `run` call returned)."""
        with self._lock:
            if not self._closed and len(self._idle) < self.size:
                self._idle.append(actor)
                return
        self.discard(actor)

    def discard(self, actor: Any) -> None:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already dead
            log.debug("warm actor already gone", exc_info=True)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for actor in idle:
            self.discard(actor)
