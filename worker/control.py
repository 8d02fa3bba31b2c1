"""The per-job control actor: how the agent (the Ray driver) and a job's ranks talk.

One small named actor per job attempt (no CPU reserved). The agent writes a stop request into
it (cancel, shutdown, lease lost); every rank polls it from a background thread, so fit()'s
per-step ``should_stop()`` reads only a local flag. Rank 0 writes the run's progress and its
outcome (completed, stopped, or failed with an `XsamError`'s classification) into it, which
lets the agent finish the job as soon as the outcome is known instead of waiting for Ray Train
to tear the worker group down. The actor is owned by the agent, so it dies with the agent.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import ray

from service.contract import RunOutcome

log = logging.getLogger(__name__)

NAMESPACE = "xsam"
#: Stop reasons the agent may write.
CANCEL, SHUTDOWN, LEASE_LOST, ABORT = "cancel", "shutdown", "lease_lost", "abort"


def control_name(agent_id: str, job_id: int, attempt: int, lease_token: str) -> str:
    # Two services' agents may share one Ray cluster: their job ids are not unique on it. A
    # released job is claimed again with the same attempt number: the lease token tells apart.
    return f"xsam-{agent_id}-job-{job_id}-attempt-{attempt}-{lease_token[:8]}"


@ray.remote(num_cpus=0, max_restarts=0)
class JobControl:
    """Shared state of one job attempt; every method is cheap and never blocks."""

    def __init__(self) -> None:
        self._stop: str | None = None
        self._progress: dict[str, int] | None = None
        self._outcome: dict[str, Any] | None = None
        self._controller: Any = None
        self._traceback: str | None = None

    def request_stop(self, reason: str) -> None:
        # The first reason wins except that a lost lease overrides all (nothing more is sent).
        if self._stop is None or reason == LEASE_LOST:
            self._stop = reason

    def stop_reason(self) -> str | None:
        return self._stop

    def set_progress(self, progress: dict[str, int]) -> None:
        self._progress = progress

    def progress(self) -> dict[str, int] | None:
        return self._progress

    def set_outcome(self, outcome: dict[str, Any]) -> None:
        if self._outcome is None or self._outcome.get("status") != RunOutcome.FAILED:
            self._outcome = outcome

    def outcome(self) -> dict[str, Any] | None:
        return self._outcome

    def set_traceback(self, rank: int, text: str) -> None:
        # The first rank to raise is the failing one; the others usually fail because of it.
        if self._traceback is None:
            self._traceback = f"rank {rank}:\n{text}"

    def traceback(self) -> str | None:
        return self._traceback

    def set_controller(self, handle: Any) -> None:
        self._controller = handle

    def controller(self) -> Any:
        return self._controller


class StopFlag:
    """A rank's view of the stop request: a thread polls the control actor every ``interval``.

    ``is_set()`` is what fit()'s ``should_stop`` calls each step: a local read, no RPC. When the
    control actor is gone (its agent died), the rank stops too.
    """

    def __init__(self, control: Any, interval: float = 0.5, on_reason=None) -> None:
        self._control = control
        self._interval = interval
        self._on_reason = on_reason
        self._set = threading.Event()
        self._closed = threading.Event()
        self.reason: str | None = None
        self._thread = threading.Thread(target=self._run, name="xsam-stop-flag", daemon=True)

    def start(self) -> StopFlag:
        self._thread.start()
        return self

    def is_set(self) -> bool:
        return self._set.is_set()

    def close(self) -> None:
        self._closed.set()

    def _run(self) -> None:
        while not self._closed.wait(self._interval):
            try:
                reason = ray.get(self._control.stop_reason.remote(), timeout=10)
            except ray.exceptions.GetTimeoutError:
                continue
            except ray.exceptions.RayActorError:
                reason = ABORT  # the agent that owns this run is gone
            if reason and reason != self.reason:
                self.reason = reason
                self._set.set()
                if self._on_reason is not None:
                    self._on_reason(reason)
            if reason in (LEASE_LOST, ABORT):
                return
