"""One job attempt on Ray: a TorchTrainer whose every rank runs `worker.rank.train_on_rank`, or,
for a one-rank CPU job, a warm actor from the agent's pool (`worker.warm_pool`) that runs the
same `worker.rank.run_rank` without Ray Train's start-up cost.

`JobRun.run()` (in the agent's thread for this job) creates the job's control actor, starts
``trainer.fit()`` in a thread of its own, and watches the control actor for rank 0's outcome.
It returns as soon as the outcome is known (so the agent can finish the job within seconds of
a cancel) and `JobRun.wait_released()` then waits for Ray Train to give the resources back,
aborting the run's controller if it does not.

Ray Train layout: ``RunConfig(name=f"job-{id}", storage_path=<storage>)`` puts Ray's run
directory at ``<storage>/job-<id>/``, beside our own ``checkpoint.pt``, which fit() writes every
epoch and on a stop; a worker group that Ray restarts (``FailureConfig(max_failures)``) and the
job's next attempt both resume from it.

While it waits for the outcome, `JobRun` applies the stall rule (worker/health.py) to the step
rank 0 publishes: a run with no new step for too long is aborted and its attempt ends as an
infrastructure failure (``error.type: stalled``), to be retried from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.callback import ControllerCallback

from service.contract import EventType, JobPublic, LeasePublic, RunOutcome
from worker.control import ABORT, CANCEL, LEASE_LOST, NAMESPACE, JobControl, control_name
from worker.failures import Failure, classify
from worker.health import HealthSettings, Stall, StallRule
from worker.rank import train_on_rank
from worker.warm_pool import WarmPool
from xsam.config import TrainConfig
from xsam.errors import StorageError

log = logging.getLogger(__name__)


@dataclass
class RunSettings:
    """What every job run of an agent shares."""

    server: str
    token: str
    storage_path: Path
    artifacts_dir: Path
    data_root: str | None = None
    agent_id: str = "agent"
    max_failures: int = 1
    report_interval_s: float = 1.0
    stop_poll_s: float = 0.5


@dataclass
class RunResult:
    """How the attempt ended, from the agent's point of view.

    ``status``: succeeded, failed (not retryable), stopped (cancel, shutdown or lease lost: see
    ``stop_reason``) or infrastructure (retryable: Ray gave up).
    """

    status: RunOutcome
    stop_reason: str | None = None
    error: dict[str, str] | None = None
    undelivered: dict[str, list[dict[str, Any]]] | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    #: Set when the stall rule aborted the run (worker/health.py).
    stall: Stall | None = None


class _RememberController(ControllerCallback):
    """Runs inside Ray Train's controller actor: hands its handle to the job's control actor,
    so that the agent can abort a run whose ranks do not stop."""

    def __init__(self, control: str) -> None:
        self.control = control

    def after_controller_start(self, train_run_context: Any) -> None:
        try:
            handle = ray.get_runtime_context().current_actor
            control = ray.get_actor(self.control, namespace=NAMESPACE)
            ray.get(control.set_controller.remote(handle), timeout=30)
        except Exception:  # only the abort fallback is lost; never fail the run for it
            log.warning("could not register the controller with %s", self.control, exc_info=True)


def scaling_for(config: TrainConfig) -> ScalingConfig:
    res = config.resources
    per_worker: dict[str, float] = {"CPU": res.cpus_per_worker}
    if res.use_gpu:
        per_worker["GPU"] = 1
    return ScalingConfig(
        num_workers=res.num_workers, use_gpu=res.use_gpu, resources_per_worker=per_worker
    )


class JobRun:
    """One claimed job attempt, from the TorchTrainer's start to the resources' release."""

    def __init__(
        self,
        job: JobPublic,
        lease: LeasePublic,
        settings: RunSettings,
        pool: WarmPool | None = None,
    ) -> None:
        self.job_id = job.id
        self.attempt = lease.attempt
        self.lease_token = lease.lease_token
        self.max_attempts = job.max_attempts or 1
        self.config = TrainConfig.model_validate(job.config)
        self.settings = settings
        self.cpus = self.config.resources.total_cpus
        self.gpus = self.config.resources.total_gpus
        self.run_dir = settings.storage_path / f"job-{self.job_id}"
        self.artifact_dir = settings.artifacts_dir / f"job-{self.job_id}"
        self._control: Any = None
        self._progress: dict[str, Any] | None = None
        self._fit_thread: threading.Thread | None = None
        res = self.config.resources
        #: One-rank CPU jobs run in a warm actor (no Ray Train); the rest in a TorchTrainer.
        self.pool = pool if res.num_workers == 1 and not res.use_gpu else None
        self._actor: Any = None
        self._actor_call: Any = None
        self._fit_error: BaseException | None = None
        self._stop_reason: str | None = None
        self.started = time.monotonic()
        #: The health rules' numbers, from the service with the lease (worker/health.py).
        self.health = HealthSettings.from_lease(lease.model_dump())
        self._stall_rule = StallRule(self.health.stall_step_multiple, self.health.stall_min_s)
        self.stall: Stall | None = None

    @property
    def control_name(self) -> str:
        return control_name(self.settings.agent_id, self.job_id, self.attempt, self.lease_token)

    # --- called from other threads -------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Ask every rank to stop at its next step (they leave a checkpoint)."""
        self._stop_reason = self._stop_reason or reason
        if self._control is not None:
            self._control.request_stop.remote(reason)

    @property
    def cancel_requested(self) -> bool:
        return self._stop_reason == CANCEL

    def progress(self) -> dict[str, Any] | None:
        """The latest progress rank 0 published (cached: no Ray call)."""
        return self._progress

    # --- the run ---------------------------------------------------------------------------

    def spec(self) -> dict[str, Any]:
        s = self.settings
        return {
            "job_id": self.job_id,
            "attempt": self.attempt,
            "lease_token": self.lease_token,
            "server": s.server,
            "token": s.token,
            "control": self.control_name,
            "config": self.config.model_dump(mode="json"),
            "checkpoint_dir": str(self.run_dir),
            "weights_out": str(self.artifact_dir / "model.pt"),
            "data_root": s.data_root,
            "report_interval_s": s.report_interval_s,
            "stop_poll_s": s.stop_poll_s,
            "health": dataclasses.asdict(self.health),
        }

    def run(self) -> RunResult:
        """Run the attempt until its outcome is known; does not wait for Ray's teardown."""
        for directory in (self.run_dir, self.artifact_dir):
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # the same storage fails every attempt: not retried
                raise StorageError.writing(directory, exc) from exc
        name = self.control_name
        # (`options` is ray.remote's ActorClass's: mypy keeps the class's type under a decorator)
        self._control = JobControl.options(name=name, namespace=NAMESPACE).remote()  # type: ignore[attr-defined]
        if self._stop_reason:
            self._control.request_stop.remote(self._stop_reason)
        if self.pool is not None:
            return self._run_warm(self.pool)
        trainer = TorchTrainer(
            # Ray Train drops the loop's return value (the warm pool's `run` hands it back).
            train_on_rank,  # type: ignore[arg-type]
            train_loop_config=self.spec(),
            scaling_config=scaling_for(self.config),
            run_config=RunConfig(
                name=f"job-{self.job_id}",
                storage_path=str(self.settings.storage_path),
                failure_config=FailureConfig(max_failures=self.settings.max_failures),
                # A Ray Train v2 controller callback: RunConfig's annotation names v1's type.
                callbacks=[_RememberController(name)],  # type: ignore[list-item]
            ),
        )
        self._fit_thread = threading.Thread(
            target=self._fit, args=(trainer,), name=f"xsam-fit-{self.job_id}", daemon=True
        )
        self._fit_thread.start()
        outcome = None
        while outcome is None:
            finished = not self._fit_thread.is_alive()
            outcome = self._poll()
            if outcome is None and finished:
                break
            if outcome is None and self._stalled():
                return self._stalled_result()
            if outcome is None:
                time.sleep(0.5)
        return self._result(outcome)

    def _run_warm(self, pool: WarmPool) -> RunResult:
        """Run the job in a warm actor; if the actor's process dies, run it again in another
        one (resuming from the checkpoint) up to ``max_failures`` times within the attempt."""
        spec, cpus = self.spec(), self.config.resources.cpus_per_worker
        restarts = 0
        while True:
            self._actor = pool.take()
            self._actor_call = self._actor.run.remote(spec, cpus)
            outcome = None
            while outcome is None:
                finished = bool(ray.wait([self._actor_call], timeout=0)[0])
                outcome = self._poll()
                if outcome is None and finished:
                    break
                if outcome is None and self._stalled():
                    return self._stalled_result()
                if outcome is None:
                    # Wakes at once when the call returns, right after rank 0's outcome.
                    ray.wait([self._actor_call], timeout=0.5)
            if outcome is not None:
                return self._result(outcome)  # wait_released() hands the actor back
            try:
                ray.get(self._actor_call)
                return self._result(None)  # returned without an outcome: a bug, retryable
            except BaseException as exc:
                self._fit_error = exc
            lost = isinstance(self._fit_error, ray.exceptions.RayActorError)
            if lost:
                pool.discard(self._actor)
                self._actor = self._actor_call = None
            if not classify(self._fit_error).retryable or self._stop_reason:
                return self._result(None)
            if restarts >= self.settings.max_failures:
                return self._result(None)
            restarts += 1
            # The new actor's start-up and resume are not a stall: the rule arms again.
            self._stall_rule = StallRule(self.health.stall_step_multiple, self.health.stall_min_s)
            log.warning("job %d: warm rank %s (%s); running it again from its checkpoint "
                        "(%d/%d)", self.job_id, "lost" if lost else "raised",
                        type(self._fit_error).__name__, restarts, self.settings.max_failures)  # fmt: skip
            if not lost:
                pool.give_back(self._actor)
                self._actor = self._actor_call = None
            self._fit_error = None

    def _fit(self, trainer: TorchTrainer) -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # classified by _result
            self._fit_error = exc

    def _poll(self) -> dict[str, Any] | None:
        try:
            progress, outcome = ray.get(
                [self._control.progress.remote(), self._control.outcome.remote()], timeout=10
            )
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            return None
        if progress:
            self._progress = progress
        return outcome

    def _stalled(self) -> bool:
        """Feed the stall rule the step rank 0 last published; True once the run is stalled."""
        now = time.monotonic()
        if self._progress is not None and self._progress.get("step") is not None:
            self._stall_rule.observe(int(self._progress["step"]), now)
        self.stall = self._stall_rule.check(now)
        return self.stall is not None

    def _stalled_result(self) -> RunResult:
        """Abort a stalled run (its ranks may not reach a step to stop at): the attempt ends as
        an infrastructure failure, so the job's next attempt resumes from the checkpoint."""
        assert self.stall is not None
        log.warning("job %d: stalled: %s; aborting the run", self.job_id, self.stall.message)
        self.abort()
        error = {"type": EventType.STALLED.value, "message": self.stall.message}
        return RunResult(RunOutcome.INFRASTRUCTURE, error=error, stall=self.stall)

    def _result(self, outcome: dict[str, Any] | None) -> RunResult:
        if outcome is None:
            exc = self._fit_error
            failure = (
                classify(exc)
                if exc is not None
                else Failure(True, "infrastructure_error", "the run ended without an outcome")
            )
            error = {**failure.as_error(), **self._traceback()}
            if not failure.retryable:
                return RunResult(RunOutcome.FAILED, error=error)
            if self._stop_reason:
                return RunResult(RunOutcome.STOPPED, stop_reason=self._stop_reason)
            return RunResult(RunOutcome.INFRASTRUCTURE, error=error)
        undelivered = outcome.get("undelivered")
        if outcome["status"] == RunOutcome.FAILED:
            return RunResult(RunOutcome.FAILED, error=outcome["error"], undelivered=undelivered)
        if outcome["status"] == RunOutcome.SUCCEEDED:
            self._write_config()
            return RunResult(
                RunOutcome.SUCCEEDED, undelivered=undelivered, summary=outcome["summary"]
            )
        # A stop nobody asked for comes from the reporter's own 409: the lease is gone.
        reason = outcome.get("stop_reason") or self._stop_reason or LEASE_LOST
        return RunResult(RunOutcome.STOPPED, stop_reason=reason, undelivered=undelivered)

    def _traceback(self) -> dict[str, str]:
        """``{"traceback": <the failing rank's>}`` when a rank raised, else ``{}``."""
        try:
            text = ray.get(self._control.traceback.remote(), timeout=10)
        except Exception:  # the control actor is gone: the error keeps its type and message
            return {}
        return {"traceback": text} if text else {}

    def _write_config(self) -> None:
        path = self.artifact_dir / "config.json"
        tmp = path.with_suffix(".json.part")
        try:
            tmp.write_text(json.dumps(self.config.model_dump(mode="json"), indent=2) + "\n")
            tmp.replace(path)
        except OSError as exc:
            raise StorageError.writing(path, exc) from exc

    def wait_released(self, timeout: float = 60.0) -> None:
        """Wait for trainer.fit() to return (resources released); abort the run if it hangs.

        A warm actor goes back to the pool once its `run` call has returned (rank 0 may still
        be flushing reports after the outcome); one that does not return in time is killed."""
        if self._actor is not None:
            ready, _ = ray.wait([self._actor_call], timeout=timeout)
            assert self.pool is not None  # (an actor is only ever taken from the pool)
            if ready:
                self.pool.give_back(self._actor)
            else:
                log.warning("job %d: warm rank did not end in %.0f s; killing it", self.job_id,
                            timeout)  # fmt: skip
                self.abort()
            self._actor = self._actor_call = None
        if self._fit_thread is None:
            if self._control is not None:
                ray.kill(self._control)
                self._control = None
            return
        self._fit_thread.join(timeout)
        if self._fit_thread.is_alive():
            log.warning("job %d: run did not end in %.0f s; aborting it", self.job_id, timeout)
            self.abort()
            self._fit_thread.join(30)
        if self._control is not None:
            ray.kill(self._control)
            self._control = None

    def abort(self) -> None:
        """Tell the ranks to stop and abort Ray Train's controller (no checkpoint promised)."""
        if self._actor is not None:
            if self._control is not None:
                self._control.request_stop.remote(ABORT)
            assert self.pool is not None  # (an actor is only ever taken from the pool)
            self.pool.discard(self._actor)
            self._actor = self._actor_call = None
            return
        if self._control is None:
            return
        self._control.request_stop.remote(ABORT)
        try:
            controller = ray.get(self._control.controller.remote(), timeout=10)
            if controller is not None:
                ray.get(controller.abort.remote(), timeout=30)
        except Exception:  # the controller exits as part of abort(): its reply may be an error
            log.debug("job %d: controller abort", self.job_id, exc_info=True)
