"""Deterministic run-time failures (out of memory, shape mismatches, storage that cannot be
written) end the job without a retry; lost processes and nodes are still retried. Pure Python:
no Ray cluster is started.

A rank classifies what it raised itself, by the exception's class (`classify_exception`); the
agent applies the same rules to what Ray hands it, unwrapped to the original exceptions
(`classify`). The exceptions here are the real ones: torch's own, raised by torch."""

from __future__ import annotations

import pytest
import torch

from worker.failures import classify, classify_exception
from xsam.checkpoint import atomic_save
from xsam.errors import DataError, StorageError


class WorkerGroupErrorLike(Exception):
    """Shaped like ray.train.WorkerGroupError: per-rank exceptions in worker_failures."""

    def __init__(self, failures):
        super().__init__("Training failed due to worker errors")
        self.worker_failures = failures


RayOOM = type("OutOfMemoryError", (Exception,), {"__module__": "ray.exceptions"})

CUDA_OOM = "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 15.78 GiB total capacity)"


def _raised(call) -> BaseException:
    try:
        call()
    except BaseException as exc:  # the very exception torch raised
        return exc
    raise AssertionError("did not raise")


def _cpu_allocation_failure() -> BaseException:
    # 40 TB: the allocator refuses at once (nothing is touched); a plain RuntimeError in torch.
    return _raised(lambda: torch.empty(10**13))


def _shape_mismatch() -> BaseException:
    return _raised(lambda: torch.zeros(3, 4) @ torch.zeros(5, 6))


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (torch.OutOfMemoryError(CUDA_OOM), "out_of_memory"),  # CUDA's, by its class
        (torch.cuda.OutOfMemoryError(CUDA_OOM), "out_of_memory"),  # the same class, older name
        (MemoryError(), "out_of_memory"),  # the host's
        (_cpu_allocation_failure(), "out_of_memory"),  # torch's CPU allocator
        (_shape_mismatch(), "shape_error"),
        (DataError("no cifar"), "data_error"),
        (StorageError("cannot write /ckpt/job-1: Read-only file system"), "storage_error"),
    ],
)  # fmt: skip
def test_a_rank_classifies_a_deterministic_failure_by_the_exception(exc, code):
    failure = classify_exception(exc)
    assert failure is not None and (failure.retryable, failure.type) == (False, code)
    assert failure.message


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("worker died unexpectedly"),
        ConnectionError("peer reset"),
        # Only the class decides for CUDA: a message that merely mentions memory is not OOM.
        RuntimeError(f"NCCL watchdog timeout; earlier in the log: {CUDA_OOM}"),
        # Ray's memory monitor killed a worker: the node's pressure, not the config.
        RayOOM("Task was killed due to the node running low on memory"),
    ],
)
def test_a_rank_leaves_anything_else_to_be_retried(exc):
    assert classify_exception(exc) is None


def test_the_out_of_memory_message_keeps_the_cause():
    failure = classify_exception(_cpu_allocation_failure())
    assert failure.message.startswith("RuntimeError: [enforce fail")
    assert "can't allocate memory" in failure.message
    assert "the same config would fail again" in failure.message


def test_a_checkpoint_that_cannot_be_written_is_a_storage_error(tmp_path):
    # A file where the run directory must be: fails for root too (a chmod would not).
    (tmp_path / "job-1").write_text("not a directory")
    with pytest.raises(StorageError) as raised:
        atomic_save({"x": torch.zeros(1)}, tmp_path / "job-1" / "checkpoint.pt")
    message = str(raised.value)
    assert message.startswith(f"cannot write {tmp_path / 'job-1' / 'checkpoint.pt'}: ")
    assert "Not a directory" in message or "File exists" in message
    assert classify_exception(raised.value).type == "storage_error"
    # A directory where the file must be: the rename over it fails.
    (tmp_path / "job-2" / "checkpoint.pt").mkdir(parents=True)
    (tmp_path / "job-2" / "checkpoint.pt" / "x").write_text("")
    with pytest.raises(StorageError, match=r"job-2/checkpoint\.pt"):
        atomic_save({"x": torch.zeros(1)}, tmp_path / "job-2" / "checkpoint.pt")
    assert [p.name for p in (tmp_path / "job-2").iterdir()] == ["checkpoint.pt"]  # no temp left


@pytest.mark.parametrize(
    ("exc", "retryable", "code"),
    [
        (WorkerGroupErrorLike({0: torch.OutOfMemoryError(CUDA_OOM)}), False, "out_of_memory"),
        (WorkerGroupErrorLike({1: MemoryError()}), False, "out_of_memory"),
        (WorkerGroupErrorLike({0: _shape_mismatch()}), False, "shape_error"),
        # a data error decides over another rank's out of memory: it names the config's fault
        (WorkerGroupErrorLike({0: MemoryError(), 1: DataError("no cifar")}), False, "data_error"),
        (WorkerGroupErrorLike({0: RayOOM("Task was killed due to low memory")}), True,
         "infrastructure_error"),
        # a lost process is still retried
        (WorkerGroupErrorLike({1: RuntimeError("worker died unexpectedly")}), True,
         "infrastructure_error"),
    ],
)  # fmt: skip
def test_the_agent_classifies_what_ray_hands_it_by_the_same_rules(exc, retryable, code):
    failure = classify(exc)
    assert (failure.retryable, failure.type) == (retryable, code)


def test_the_cause_is_named_in_the_error():
    failure = classify(WorkerGroupErrorLike({0: torch.OutOfMemoryError(CUDA_OOM)}))
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
