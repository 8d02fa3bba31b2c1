"""Deterministic run-time failures (out of memory, shape mismatches) end the job without a
retry; lost processes and nodes are still retried. Pure Python: no Ray cluster is started."""

from __future__ import annotations

import pytest

from worker.failures import classify


class WorkerGroupErrorLike(Exception):
    """Shaped like ray.train.WorkerGroupError: per-rank exceptions in worker_failures."""

    def __init__(self, failures):
        super().__init__("Training failed due to worker errors")
        self.worker_failures = failures


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError (classified by name: the agent imports no torch
    for this)."""


RayOOM = type("OutOfMemoryError", (Exception,), {"__module__": "ray.exceptions"})

CUDA_OOM = "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 15.78 GiB total capacity)"


@pytest.mark.parametrize(
    ("exc", "retryable", "code"),
    [
        (WorkerGroupErrorLike({0: OutOfMemoryError(CUDA_OOM)}), False, "out_of_memory"),
        (RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried to "
                      "allocate 12000000000000 bytes"), False, "out_of_memory"),
        (WorkerGroupErrorLike({1: MemoryError()}), False, "out_of_memory"),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied (125x40 and 64x10)"), False,
         "shape_error"),
        (RuntimeError("Error(s) in loading state_dict: size mismatch for fc.weight"), False,
         "shape_error"),
        # Ray's memory monitor killed a worker: the node's pressure, not the config: retried
        (WorkerGroupErrorLike({0: RayOOM("Task was killed due to the node running low on memory")}),
         True, "infrastructure_error"),
        # a lost process is still retried
        (WorkerGroupErrorLike({1: RuntimeError("worker died unexpectedly")}), True,
         "infrastructure_error"),
    ],
)  # fmt: skip
def test_deterministic_failures_are_not_retried(exc, retryable, code):
    failure = classify(exc)
    assert (failure.retryable, failure.type) == (retryable, code)
    if not retryable:
        assert failure.message  # the cause is in the job's error


def test_the_cause_is_named_in_the_error():
    failure = classify(WorkerGroupErrorLike({0: OutOfMemoryError(CUDA_OOM)}))
    assert failure.as_error()["message"].startswith("OutOfMemoryError: CUDA out of memory")


def test_an_infrastructure_failure_is_named_by_what_was_raised_inside_ray():
    # What a warm rank's unwritable checkpoint directory looks like to the agent: Ray's
    # wrapper, whose own text is its actor method and pid in terminal colours.
    from ray.exceptions import RayTaskError

    inner = NotADirectoryError(20, "Not a directory", "/ckpt/job-1/undelivered.part")
    wrapped = RayTaskError(
        "\x1b[36mray::WarmRank.run()\x1b[39m", "Traceback (most recent call last): …", inner
    ).as_instanceof_cause()
    failure = classify(wrapped)
    assert (failure.retryable, failure.type) == (True, "infrastructure_error")
    assert failure.message == (
        "NotADirectoryError: [Errno 20] Not a directory: '/ckpt/job-1/undelivered.part'"
    )


def test_a_failure_with_only_ray_inside_keeps_ray_s_text_without_terminal_colours():
    RayError = type("ActorDiedError", (Exception,), {"__module__": "ray.exceptions"})
    failure = classify(RayError("\x1b[31mThe actor died unexpectedly\x1b[39m"))
    assert failure.message == "ActorDiedError: The actor died unexpectedly"
