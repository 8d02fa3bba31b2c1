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
