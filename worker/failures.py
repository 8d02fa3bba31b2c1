"""Failure classification: what a retry can fix and what it cannot.

- An `xsam.errors.XsamError` (invalid config, missing data, a model that cannot be built, a
  diverged run, checkpoint storage that cannot be written) will fail the same way again: the
  job ends ``failed`` with ``{type: exc.code, message: str(exc)}`` and is not retried.
- Running out of memory (host ``MemoryError``, ``torch.OutOfMemoryError`` — CUDA's — and the
  CPU allocator's "can't allocate memory") and tensor shape mismatches are deterministic for a
  config too: the same run on the same kind of node fails the same way, so they end the job
  ``failed`` (``out_of_memory`` / ``shape_error``) with the cause in its message, without a
  retry.
- Anything else (a rank's process or node lost, an unexpected exception, Ray itself failing) is
  an infrastructure failure: Ray Train restarts the worker group from the latest checkpoint
  (``FailureConfig(max_failures)``) within the attempt; past that, the service's next attempt
  resumes from the same checkpoint.

The rank classifies what it raised itself, with the exception object in hand
(`classify_exception`, by type: torch's own ``OutOfMemoryError`` class, ``MemoryError``, the
`XsamError` classes; by the exception's own message only where torch has no class of its own:
the CPU allocator and shape mismatches are plain ``RuntimeError``). A deterministic failure is
written to the control actor as the run's outcome and the rank returns normally, so neither Ray
Train nor the agent retries it. What reaches the agent is what escaped a rank (a lost process,
Ray failing): `classify` unwraps Ray's wrappers (``WorkerGroupError.worker_failures``,
``cause``, ``__cause__``) and applies the same rules to each original exception, never to a
traceback's text.
"""

from __future__ import annotations

import re
import sys
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


#: torch raises these as plain RuntimeError: no class to test, so the exception's own message.
_CPU_ALLOCATOR = re.compile(
    r"CPUAllocator: can't allocate memory|not enough memory: you tried to allocate"
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SHAPE = re.compile(
    r"size mismatch|shapes cannot be multiplied|must match the size of tensor|"
    r"Expected input batch_size|Given groups=\d+, weight of size|Calculated padded input size",
)


def _out_of_memory_types() -> tuple[type[BaseException], ...]:
    """``MemoryError`` and, where torch is loaded (every rank), ``torch.OutOfMemoryError``
    (``torch.cuda.OutOfMemoryError`` is the same class). Never imports torch itself."""
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return (MemoryError, oom) if isinstance(oom, type) else (MemoryError,)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    name = type(exc).__name__
    return (f"{name}: {lines[0]}" if lines else name)[:2000]


def classify_exception(exc: BaseException) -> Failure | None:
    """The deterministic failure ``exc`` itself is (not its causes), or None (retryable).

    By class: an `XsamError` (its ``code``), ``MemoryError`` or ``torch.OutOfMemoryError``
    (``out_of_memory``). By the exception's own message where torch has no class: the CPU
    allocator's ``RuntimeError`` (``out_of_memory``) and shape mismatches (``shape_error``).
    Ray's own exceptions are never deterministic: its memory monitor killing a worker is the
    node's pressure, not the config's.
    """
    if isinstance(exc, XsamError):
        return Failure(False, exc.code, str(exc))
    if type(exc).__module__.startswith("ray"):
        return None
    if isinstance(exc, _out_of_memory_types()) or (
        isinstance(exc, RuntimeError) and _CPU_ALLOCATOR.search(str(exc))
    ):
        return Failure(False, "out_of_memory", f"{_first_line(exc)} (the same config would "
                       "fail again)")  # fmt: skip
    if isinstance(exc, RuntimeError | ValueError) and _SHAPE.search(str(exc)):
        return Failure(False, "shape_error", _first_line(exc))
    return None


def classify(exc: BaseException) -> Failure:
    """Find an `XsamError` (or a deterministic failure: out of memory, a shape mismatch)
    anywhere inside what Ray raised; otherwise call it an infrastructure failure."""
    causes = list(_causes(exc))
    found = [f for f in map(classify_exception, causes) if f is not None]
    # An XsamError decides over another rank's out-of-memory: it names the config's fault.
    named = [f for f in found if f.type not in ("out_of_memory", "shape_error")]
    if found:
        return (named or found)[0]
    # Named by what was raised inside Ray (a rank's NotADirectoryError, say), not by Ray's
    # wrapper, whose own text is only "ray::WarmRank.run() (pid=…, ip=…)" in terminal colours.
    cause = next((c for c in causes if not type(c).__module__.startswith("ray")), exc)
    first_line = (_ANSI.sub("", str(cause)).strip().splitlines() or [type(cause).__name__])[0]
    return Failure(True, "infrastructure_error", f"{type(cause).__name__}: {first_line}"[:2000])
