"""Failure classification: what a retry can fix and what it cannot.

- An `xsam.errors.XsamError` (invalid config, missing data, a model that cannot be built, a
  diverged run) will fail the same way again: the job ends ``failed`` with
  ``{type: exc.code, message: str(exc)}`` and is not retried.
- Running out of memory (host ``MemoryError``, ``torch.cuda.OutOfMemoryError``, an allocator
  that cannot allocate) and tensor shape mismatches are deterministic for a config too: the
  same run on the same kind of node fails the same way, so they end the job ``failed``
  (``out_of_memory`` / ``shape_error``) with the cause in its message, without a retry.
- Anything else (a rank's process or node lost, an unexpected exception, Ray itself failing) is
  an infrastructure failure: Ray Train restarts the worker group from the latest checkpoint
  (``FailureConfig(max_failures)``) within the attempt; past that, the service's next attempt
  resumes from the same checkpoint.

Ray wraps what a rank raised: `ray.train.WorkerGroupError` keeps each rank's exception in
``worker_failures``, and task/actor errors chain it through ``cause``/``__cause__``; `classify`
unwraps all of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from xsam.errors import XsamError


@dataclass(frozen=True)
class Failure:
    """A classified failure: ``retryable`` False means "finish failed, do not retry"."""

    retryable: bool
    type: str
    message: str

    def as_error(self) -> dict[str, str]:
        return {"type": self.type, "message": self.message}


def _causes(exc: BaseException, seen: set[int] | None = None) -> Iterator[BaseException]:
    seen = set() if seen is None else seen
    if id(exc) in seen:
        return
    seen.add(id(exc))
    yield exc
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict):
        for rank in sorted(failures):
            yield from _causes(failures[rank], seen)
    for inner in (getattr(exc, "cause", None), exc.__cause__, exc.__context__):
        if isinstance(inner, BaseException):
            yield from _causes(inner, seen)


#: Exceptions (by class name: no torch import here) and messages that a retry cannot fix.
_OUT_OF_MEMORY_TYPES = frozenset({"MemoryError", "OutOfMemoryError"})
_OUT_OF_MEMORY = re.compile(
    r"CUDA out of memory|out of memory|can't allocate memory|not enough memory|"
    r"Tried to allocate|failed to allocate",
    re.IGNORECASE,
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SHAPE = re.compile(
    r"size mismatch|shapes cannot be multiplied|must match the size of tensor|"
    r"Expected input batch_size|Given groups=\d+, weight of size|Calculated padded input size",
)


def _deterministic(cause: BaseException) -> Failure | None:
    text = str(cause)
    first = (text.strip().splitlines() or [type(cause).__name__])[0]
    message = f"{type(cause).__name__}: {first}"[:2000]
    if type(cause).__module__.startswith("ray"):
        return None  # Ray's own (its memory monitor killing a worker): the node, not the config
    if type(cause).__name__ in _OUT_OF_MEMORY_TYPES or (
        isinstance(cause, RuntimeError) and _OUT_OF_MEMORY.search(text)
    ):
        return Failure(False, "out_of_memory", f"{message} (the same config would fail again)")
    if isinstance(cause, RuntimeError | ValueError) and _SHAPE.search(text):
        return Failure(False, "shape_error", message)
    return None


def classify(exc: BaseException) -> Failure:
    """Find an `XsamError` (or a deterministic failure: out of memory, a shape mismatch)
    anywhere inside ``exc``; otherwise call it an infrastructure failure."""
    causes = list(_causes(exc))
    for cause in causes:
        if isinstance(cause, XsamError):
            return Failure(False, cause.code, str(cause))
    for cause in causes:
        found = _deterministic(cause)
        if found is not None:
            return found
    # Named by what was raised inside Ray (a rank's NotADirectoryError, say), not by Ray's
    # wrapper, whose own text is only "ray::WarmRank.run() (pid=…, ip=…)" in terminal colours.
    cause = next((c for c in causes if not type(c).__module__.startswith("ray")), exc)
    first_line = (_ANSI.sub("", str(cause)).strip().splitlines() or [type(cause).__name__])[0]
    return Failure(True, "infrastructure_error", f"{type(cause).__name__}: {first_line}"[:2000])
