"""Failure classification: what a retry can fix and what it cannot.

- An `xsam.errors.XsamError` (invalid config, missing data, a model that cannot be built, a
  diverged run) will fail the same way again: the job ends ``failed`` with
  ``{type: exc.code, message: str(exc)}`` and is not retried.
- Anything else (a rank's process or node lost, an unexpected exception, Ray itself failing) is
  an infrastructure failure: Ray Train restarts the worker group from the latest checkpoint
  (``FailureConfig(max_failures)``) within the attempt; past that, the service's next attempt
  resumes from the same checkpoint.

Ray wraps what a rank raised: `ray.train.WorkerGroupError` keeps each rank's exception in
``worker_failures``, and task/actor errors chain it through ``cause``/``__cause__``; `classify`
unwraps all of them.
"""

from __future__ import annotations

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


def classify(exc: BaseException) -> Failure:
    """Find an `XsamError` anywhere inside ``exc``; otherwise call it an infrastructure failure."""
    for cause in _causes(exc):
        if isinstance(cause, XsamError):
            return Failure(False, cause.code, str(cause))
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return Failure(True, "infrastructure_error", f"{type(exc).__name__}: {first_line}"[:2000])
