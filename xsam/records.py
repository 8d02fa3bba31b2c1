"""What `xsam.training.fit` hands its caller: the records it reports and the summary it returns.

Standard library only, so the service's contract (service/contract.py) can name these types
without torch. They stay plain dicts at run time (a reporter may pickle them across Ray); the
TypedDicts say which keys each carries, the enums which words.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal, TypedDict


class FitOutcome(StrEnum):
    """How `fit()` ended (a failure raises instead): the training loop's word, not a job status."""

    #: Every epoch ran; the final weights were written (rank 0, when asked to).
    COMPLETED = "completed"
    #: `should_stop()` asked for a stop: a consistent checkpoint was written, no final weights.
    STOPPED = "stopped"


class FitEvent(StrEnum):
    """The types of the events `fit()` reports (docs/internals.md lists each one's data)."""

    STARTED = "started"
    EPOCH_DONE = "epoch_done"
    ALPHA_SEARCH = "alpha_search"
    ALPHA_CHECK = "alpha_check"
    CHECKPOINT = "checkpoint"
    STOPPED = "stopped"
    FINISHED = "finished"


class MetricsRecord(TypedDict):
    """Metric values at a global optimizer step (1-based) in an epoch (1-based)."""

    kind: Literal["metrics"]
    step: int
    epoch: int
    values: dict[str, float]


class EventRecord(TypedDict):
    """A lifecycle event; `key`, when set, makes it idempotent across a resume."""

    kind: Literal["event"]
    type: FitEvent
    message: str
    data: dict[str, Any]
    key: str | None


#: What `report(record)` is called with, on rank 0 only.
FitRecord = MetricsRecord | EventRecord


class FitSummary(TypedDict):
    """What `fit()` returns on every rank."""

    status: FitOutcome
    epochs_completed: int
    steps: int
    metrics: dict[str, float]
    fit_seconds: float
    alpha: float | None
