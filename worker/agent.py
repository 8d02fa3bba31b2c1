"""The agent: claim jobs that fit the Ray cluster's free capacity, run each, finish it.

One agent per Ray cluster, running as a Ray driver on the head node. Its loop:

1. free capacity = Ray's available CPUs/GPUs, but never more than the cluster's total minus
   what this agent's own runs asked for (Ray counts a run's resources only once its placement
   group is up, so the first term alone would claim the same CPUs twice);
2. ``POST /v1/agent/claim`` with it; a job that fits comes back with a lease;
3. the job runs in a thread of its own (`JobRun`), its lease beaten by the `Heartbeats` thread;
4. when the run's outcome is known the job is finished: ``succeeded``, ``failed`` (an
   `XsamError`: no retry), ``cancelled``; an infrastructure failure leaves the lease to expire,
   so that the service's reaper requeues the job for its next attempt (which resumes from the
   checkpoint), or fails it when no attempts are left;
5. on shutdown every run stops at its next step with a checkpoint and its job is released
   (``POST /v1/agent/jobs/{id}/release``): queued again at once, the attempt not counted, so
   the next agent resumes it from the checkpoint. If the service cannot be reached, the lease
   expires instead (the reaper requeues the job, with an attempt used).

Everything goes over HTTP through `service.client`; the agent never touches the database.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import ray

from service.client import ApiError, LeaseLost, ServiceUnreachable, XsamClient
from service.contract import EventType, JobPublic, JobStatus, LeasePublic, RunOutcome
from worker.control import CANCEL, LEASE_LOST, NAMESPACE, SHUTDOWN
from worker.failures import classify
from worker.heartbeat import Heartbeats, Lease
from worker.ray_run import JobRun, RunResult, RunSettings
from worker.warm_pool import WarmPool

log = logging.getLogger(__name__)


@dataclass
class AgentSettings:
    server: str
    token: str
    run: RunSettings
    agent_id: str = ""
    ray_address: str | None = None
    max_jobs: int = 4
    poll_interval_s: float = 1.0
    #: How long a finished run may take to hand its resources back before it is aborted.
    release_timeout_s: float = 60.0
    #: Idle warm actors kept for one-rank CPU jobs (worker/warm_pool.py); 0 = none.
    warm_actors: int = 2

    def __post_init__(self) -> None:
        if not self.agent_id:
            self.agent_id = f"{socket.gethostname()}-{os.getpid()}"
        self.run.agent_id = self.agent_id


class Agent:
    """Claim → run on Ray → finish, for as many jobs at once as capacity and ``max_jobs`` allow."""

    def __init__(self, settings: AgentSettings, client: XsamClient | None = None) -> None:
        self.settings = settings
        self.client = client or XsamClient(settings.server, settings.token, timeout=10)
        self.heartbeats = Heartbeats(XsamClient(settings.server, settings.token, timeout=5))
        self._runs: dict[int, JobRun] = {}
        self._threads: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.pool: WarmPool | None = None

    # --- capacity ----------------------------------------------------------------------------

    def capacity(self) -> tuple[float, int]:
        """Free (CPUs, GPUs) for a new job."""
        available = ray.available_resources()
        total = ray.cluster_resources()
        with self._lock:
            held_cpus = sum(r.cpus for r in self._runs.values())
            held_gpus = sum(r.gpus for r in self._runs.values())
        cpus = min(available.get("CPU", 0.0), total.get("CPU", 0.0) - held_cpus)
        gpus = min(available.get("GPU", 0.0), total.get("GPU", 0.0) - held_gpus)
        return max(cpus, 0.0), max(int(gpus + 1e-9), 0)

    def running(self) -> list[int]:
        with self._lock:
            return sorted(self._runs)

    # --- the loop ------------------------------------------------------------------------------

    def connect(self) -> None:
        if not ray.is_initialized():
            ray.init(
                address=self.settings.ray_address or "auto",
                namespace=NAMESPACE,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
        if self.pool is None and self.settings.warm_actors > 0:
            self.pool = WarmPool(self.settings.warm_actors)
            self.pool.prewarm(1)

    def run(self, stop: threading.Event) -> None:
        """Claim and run jobs until ``stop`` is set, then shut down (see `shutdown`)."""
        self.connect()
        self.heartbeats.start()
        log.info(
            "agent %s: claiming from %s (Ray: %s)",
            self.settings.agent_id,
            self.settings.server,
            ray.cluster_resources().get("CPU"),
        )
        try:
            while not stop.is_set():
                claimed = self._claim_once()
                if not claimed:
                    stop.wait(self.settings.poll_interval_s)
        finally:
            self.shutdown()

    def _claim_once(self) -> bool:
        self._reap_threads()
        if len(self.running()) >= self.settings.max_jobs:
            return False
        cpus, gpus = self.capacity()
        if cpus <= 0:
            return False
        try:
            claim = self.client.claim(self.settings.agent_id, cpus, gpus)
        except ServiceUnreachable as exc:
            log.warning("claim: service unreachable: %s", exc.detail)
            return False
        except ApiError as exc:
            log.error("claim refused: %s", exc)
            return False
        if claim is None:
            return False
        self._start(claim.job, claim.lease)
        return True

    def _start(self, job: JobPublic, lease: LeasePublic) -> None:
        run = JobRun(job, lease, self.settings.run, pool=self.pool)
        log.info("job %d: claimed (attempt %d)", run.job_id, run.attempt)
        lost = threading.Event()

        def on_lost() -> None:
            lost.set()
            run.request_stop(LEASE_LOST)

        self.heartbeats.add(
            Lease(
                job_id=run.job_id,
                lease_token=run.lease_token,
                interval=lease.heartbeat_interval_s,
                on_cancel=lambda: run.request_stop(CANCEL),
                on_lost=on_lost,
                progress=run.progress,
            )
        )
        thread = threading.Thread(
            target=self._run_job, args=(run, lost), name=f"xsam-job-{run.job_id}", daemon=True
        )
        with self._lock:
            self._runs[run.job_id] = run
            self._threads[run.job_id] = thread
        thread.start()

    def _run_job(self, run: JobRun, lost: threading.Event) -> None:
        try:
            try:
                result = run.run()
            except Exception as exc:  # storage that cannot be written, a bug, Ray failing
                failure = classify(exc)
                if failure.retryable:
                    log.exception("job %d: the run could not be started", run.job_id)
                    result = RunResult(RunOutcome.INFRASTRUCTURE, error=failure.as_error())
                else:
                    log.error("job %d: %s: %s", run.job_id, failure.type, failure.message)
                    result = RunResult(RunOutcome.FAILED, error=failure.as_error())
            if not lost.is_set():
                self._conclude(run, result, lost)
            else:
                log.info("job %d: lease lost; reporting nothing more", run.job_id)
        finally:
            self.heartbeats.remove(run.job_id)
            try:
                run.wait_released(self.settings.release_timeout_s)
            finally:
                with self._lock:
                    self._runs.pop(run.job_id, None)

    def _conclude(self, run: JobRun, result: RunResult, lost: threading.Event) -> None:
        """Deliver what rank 0 could not, then finish the job (or leave it to the reaper)."""
        log.info("job %d: run ended: %s %s", run.job_id, result.status, result.stop_reason or "")
        if result.status == RunOutcome.STOPPED and result.stop_reason == LEASE_LOST:
            return
        self._deliver(run, result.undelivered, lost)
        if result.stall is not None:  # the stall rule aborted the run (worker/health.py)
            self._event(run, EventType.STALLED,
                        f"stalled: {result.stall.message}; the run was aborted",
                        lost, data=result.stall.as_data())  # fmt: skip
        if result.status == RunOutcome.SUCCEEDED:
            self._final_progress(run, result.summary)
            self._finish(run, JobStatus.SUCCEEDED, None, lost)
        elif result.status == RunOutcome.FAILED:
            self._finish(run, JobStatus.FAILED, result.error, lost)
        elif result.stop_reason == CANCEL or (
            result.status == RunOutcome.INFRASTRUCTURE and run.cancel_requested
        ):
            # Cancelled: stopped at a step, or broken while stopping; a cancel wins either way.
            self._finish(run, JobStatus.CANCELLED, None, lost)
        elif result.status == RunOutcome.INFRASTRUCTURE and run.attempt >= run.max_attempts:
            self._finish(run, JobStatus.FAILED, result.error, lost)
        elif result.status == RunOutcome.STOPPED and result.stop_reason == SHUTDOWN:
            self._release(run, lost)
        else:
            # An infrastructure failure with attempts left: stop heartbeating, so the lease
            # expires and the reaper requeues the job (an attempt used); the next one resumes.
            why = result.error["message"] if result.error else f"agent {result.stop_reason}"
            self._event(run, EventType.ATTEMPT_ENDED, f"attempt {run.attempt} ended: {why}; "
                        "the job will be requeued when its lease expires", lost)  # fmt: skip

    def _deliver(self, run: JobRun, left: dict[str, list] | None, lost: threading.Event) -> None:
        if not left:
            return
        for kind in ("events", "points"):
            items = left.get(kind) or []
            for i in range(0, len(items), 1000):
                batch = items[i : i + 1000]
                send = self.client.ingest_events if kind == "events" else self.client.ingest_metrics
                if not self._retry(lambda b=batch, f=send: f(run.job_id, run.lease_token, b), lost):
                    return

    def _finish(
        self, run: JobRun, status: JobStatus, error: dict[str, str] | None, lost: threading.Event
    ) -> None:
        if self._retry(
            lambda: self.client.finish(run.job_id, run.lease_token, status, error), lost
        ):
            log.info("job %d: finished %s", run.job_id, status)

    def _release(self, run: JobRun, lost: threading.Event) -> None:
        """Hand a job stopped for shutdown back to the service: queued at once, its attempt not
        counted; the next claim resumes it from the checkpoint the stop wrote."""
        # No beat after the release: its old token would be refused (409, "lease lost").
        self.heartbeats.remove(run.job_id)
        reason = f"agent {self.settings.agent_id} shut down; the run stopped with a checkpoint"
        # Bounded: an unreachable service must not hold up the shutdown. Its fallback is the old
        # path: the lease expires and the reaper requeues the job (an attempt used).
        released: list[JobPublic] = []
        if self._retry(
            lambda: released.append(self.client.release(run.job_id, run.lease_token, reason)),
            lost,
            deadline_s=10,
        ):
            # Queued (attempt not counted), or cancelled if a cancel had been requested.
            log.info("job %d: released -> %s", run.job_id, released[-1].status)
        elif not lost.is_set():
            log.warning(
                "job %d: not released; the service requeues it when its lease expires", run.job_id
            )

    def _final_progress(self, run: JobRun, summary: dict[str, Any]) -> None:
        # The last heartbeat may predate the last epoch: show the run complete.
        steps, epochs = summary.get("steps"), summary.get("epochs_completed")
        if steps is None or epochs is None:
            return
        progress = {"epoch": epochs, "epochs": epochs, "step": steps, "steps": steps}
        try:
            self.client.heartbeat(run.job_id, run.lease_token, progress=progress)
        except ApiError as exc:
            log.debug("job %d: final progress not recorded: %s", run.job_id, exc)

    def _event(
        self,
        run: JobRun,
        type_: str,
        message: str,
        lost: threading.Event,
        data: dict[str, Any] | None = None,
    ) -> None:
        event = {
            "type": type_,
            "message": message,
            "data": {"attempt": run.attempt, **(data or {})},
        }
        self._retry(lambda: self.client.ingest_events(run.job_id, run.lease_token, [event]), lost,
                    deadline_s=10)  # fmt: skip

    def _retry(self, call, lost: threading.Event, deadline_s: float = 120.0) -> bool:
        """Call until it succeeds, the lease is lost, or ``deadline_s`` passes (service down)."""
        deadline = time.monotonic() + deadline_s
        delay = 0.5
        while not lost.is_set():
            try:
                call()
                return True
            except LeaseLost:
                lost.set()
                return False
            except (ServiceUnreachable, ApiError) as exc:
                if isinstance(exc, ApiError) and 400 <= exc.status < 500 and exc.status != 429:
                    log.error("refused: %s", exc)
                    return False
                if time.monotonic() > deadline:
                    log.error("giving up after %.0f s: %s", deadline_s, exc)
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        return False

    def _reap_threads(self) -> None:
        with self._lock:
            for job_id, thread in list(self._threads.items()):
                if not thread.is_alive():
                    del self._threads[job_id]

    # --- shutdown --------------------------------------------------------------------------

    def shutdown(self, timeout: float = 90.0) -> None:
        """Stop every run at its next step (each leaves a checkpoint) and wait for them.

        Each stopped job is released (queued again at once, its attempt not counted), so the
        next agent resumes it from its checkpoint; one that cannot be released (service
        unreachable) is requeued by the service when its lease expires, with an attempt used.
        """
        if self._stopping.is_set():
            return
        self._stopping.set()
        with self._lock:
            runs = list(self._runs.values())
            threads = list(self._threads.values())
        for run in runs:
            log.info("job %d: stopping for shutdown", run.job_id)
            run.request_stop(SHUTDOWN)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.heartbeats.stop()
        if self.pool is not None:
            self.pool.close()
