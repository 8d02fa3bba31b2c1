"""What every rank of a job runs: xsam.training.fit, wired to the service.

Under Ray Train, torch.distributed (gloo on CPU, NCCL on GPU) is initialised when
`train_on_rank` starts; a one-rank job in a warm actor calls `run_rank` directly. Each rank polls the job's control actor for a stop request (cancel,
shutdown, lease lost); rank 0 also reports metrics and events through a `Reporter` and writes the
run's outcome to the control actor. The checkpoint lives at ``<checkpoint_dir>/checkpoint.pt``
(shared storage): a restarted worker group, or the job's next attempt, resumes from it.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
import uuid
from pathlib import Path
from typing import Any

import ray

from service.contract import RUN_OUTCOME_OF_FIT, EventType, RunOutcome
from worker.control import LEASE_LOST, NAMESPACE, StopFlag
from xsam.records import FitRecord

log = logging.getLogger(__name__)

#: Beside checkpoint.pt: the reports not yet delivered when it was written.
UNDELIVERED = "undelivered.json"
#: Seconds rank 0 keeps trying to deliver its last reports before handing them to the agent.
FINAL_FLUSH_S = 5.0


def _rank_device() -> str:
    import ray.train.torch

    device = ray.train.torch.get_device()
    return str(device)


def train_on_rank(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The Ray Train loop function; ``spec`` is built by `worker.ray_run.JobRun`."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    # The GPU Ray Train assigned to this rank (CPU when the job has none).
    return run_rank(spec, rank=rank, device=_rank_device())


def run_rank(spec: dict[str, Any], *, rank: int, device: str) -> dict[str, Any] | None:
    """One rank of a job attempt: under Ray Train (`train_on_rank`) or, for a one-rank job, in
    a warm actor (`worker.warm_pool.WarmRank`, rank 0, no process group)."""
    from service.client import XsamClient
    from worker.log_capture import capture_rank_logs
    from worker.run_environment import record_environment

    control = ray.get_actor(spec["control"], namespace=NAMESPACE)
    # Hook-in point of the log capture: every rank's stdout, stderr and logging, for the whole
    # run, go to the service; a rank that raises leaves its traceback with the control actor.
    client = XsamClient(spec["server"], spec["token"], timeout=10)
    with capture_rank_logs(
        client, spec["job_id"], spec["lease_token"], rank,
        interval=spec.get("report_interval_s", 1.0),
    ) as shipper:  # fmt: skip
        record_environment(client, spec["job_id"], spec["lease_token"], spec["attempt"], rank)
        try:
            return _train(spec, rank, control, client, device, shipper)
        except BaseException:
            text = traceback.format_exc()
            sys.stderr.write(text)  # into the job's log too
            shipper.flush(FINAL_FLUSH_S)  # before the agent can learn the outcome
            ray.get(control.set_traceback.remote(rank, text))
            raise


def _train(
    spec: dict[str, Any], rank: int, control: Any, client: Any, device: str, shipper: Any
) -> dict[str, Any] | None:
    from worker.failures import classify_exception
    from worker.health import AlphaEdgeRule, HealthSettings, watch_alpha
    from worker.reporter import Reporter
    from xsam.config import TrainConfig
    from xsam.errors import StorageError
    from xsam.training import fit

    previous = ray.get(control.outcome.remote())
    if previous is not None and previous.get("status") == RunOutcome.FAILED:
        return None  # a restarted group after a failure that no retry can fix: do nothing

    reporter: Reporter | None = None
    if rank == 0:
        reporter = Reporter(
            client,
            spec["job_id"],
            spec["lease_token"],
            interval=spec.get("report_interval_s", 1.0),
            on_progress=lambda p: control.set_progress.remote(p),
            # Unique per reporter: a worker group that Ray restarts within the attempt has one
            # of its own, so its "started (resumed …)" is not taken for a replay.
            key_prefix=f"attempt-{spec['attempt']}-{uuid.uuid4().hex[:8]}",
        ).start()

    def on_reason(reason: str) -> None:
        if reason == LEASE_LOST and reporter is not None:
            reporter.lose_lease()

    stop = StopFlag(control, interval=spec.get("stop_poll_s", 0.5), on_reason=on_reason).start()
    checkpoint_dir = Path(spec["checkpoint_dir"])
    checkpoint = checkpoint_dir / "checkpoint.pt"
    undelivered = checkpoint_dir / UNDELIVERED
    report = None
    if reporter is not None:
        if checkpoint.exists() and undelivered.exists():
            reporter.replay(json.loads(undelivered.read_text()))

        def persist(*_: Any) -> None:
            # Written before fit's epoch checkpoint (at epoch_done) and after a stop's: the
            # records a checkpoint covers are always delivered or on disk beside it.
            tmp = undelivered.with_suffix(".part")
            try:
                tmp.write_text(json.dumps(reporter.snapshot()))
                tmp.replace(undelivered)
            except OSError as exc:  # the checkpoint beside it could not be trusted either
                raise StorageError.writing(undelivered, exc) from exc

        # α pinned at an edge of its grid for many searches: one warning event (worker/health.py).
        health = HealthSettings(**spec.get("health", {}))
        alpha_max = spec["config"].get("optimizer", {}).get("alpha_max")
        watched = watch_alpha(reporter, AlphaEdgeRule(health.alpha_edge_searches, alpha_max))

        def report(record: FitRecord) -> None:
            watched(record)
            if record.get("type") == EventType.EPOCH_DONE:
                persist()

    try:
        summary = fit(
            TrainConfig.model_validate(spec["config"]),
            report=report,
            checkpoint_dir=checkpoint_dir,
            resume_from=checkpoint if checkpoint.exists() else None,
            on_checkpoint=persist if reporter is not None else None,
            should_stop=lambda: stop.is_set() or (reporter is not None and reporter.lease_lost),
            data_root=spec.get("data_root"),
            device=device,
            weights_out=spec["weights_out"] if rank == 0 else None,
        )
    except Exception as exc:
        # Classified here, with the exception object in hand (by its class: worker/failures.py).
        failure = classify_exception(exc)
        if failure is None:  # retryable: Ray Train (or the agent) runs it again
            if reporter is not None:
                reporter.close(FINAL_FLUSH_S)
            raise
        # No retry can fix this: record the classification and return normally, so that Ray
        # Train does not restart the group; the agent finishes the job `failed`.
        text = traceback.format_exc()
        sys.stderr.write(text)  # into the job's log too
        # Delivered before the outcome: the agent finishes the job (and ends the lease that
        # fences log lines) as soon as it knows it.
        shipper.flush(FINAL_FLUSH_S)
        left = reporter.close(FINAL_FLUSH_S) if reporter is not None else None
        error = {**failure.as_error(), "traceback": text}
        ray.get(control.set_outcome.remote({"status": RunOutcome.FAILED, "error": error,
                                             "rank": rank,
                                            "undelivered": left}))  # fmt: skip
        return None
    except BaseException:
        if reporter is not None:
            reporter.close(FINAL_FLUSH_S)
        raise
    finally:
        stop.close()
    if reporter is None:
        return None
    left = reporter.close(FINAL_FLUSH_S)
    outcome = {
        "status": RUN_OUTCOME_OF_FIT[summary["status"]],
        "stop_reason": stop.reason,
        "summary": {k: v for k, v in summary.items() if k != "metrics"},
        "metrics": summary.get("metrics", {}),
        "undelivered": None if reporter.lease_lost else left,
    }
    ray.get(control.set_outcome.remote(outcome))
    return outcome
