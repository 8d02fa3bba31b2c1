"""The words of the contract: job and study statuses, roles, event types, run outcomes.

Each is a `StrEnum`, so a member is its own JSON string and compares equal to it: the wire is
unchanged, and the rest of the code names the word instead of spelling it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import PlainValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

from xsam.records import FitEvent, FitOutcome


class JobStatus(StrEnum):
    """Where a job is in its life."""

    #: Waiting for an agent with enough free capacity (and for its retry backoff to pass); also
    #: where a running job goes back to when its agent releases it or its lease expires.
    QUEUED = "queued"
    #: Claimed by an agent that holds its lease and heartbeats; may have a cancel requested.
    RUNNING = "running"
    #: The run finished and its weights are at <artifacts_dir>/job-<id>/model.pt.
    SUCCEEDED = "succeeded"
    #: The run failed for good: the agent said so, or its lease expired with no attempts left.
    FAILED = "failed"
    #: Cancelled by its owner: at once while queued, or by the agent (or reaper) while running.
    CANCELLED = "cancelled"


#: The statuses a job never leaves; the only ones an agent may finish a job with.
TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class StudyStatus(StrEnum):
    """A study's status, from its jobs' (DESIGN.md "Studies")."""

    #: From submit until every job of the study is terminal.
    RUNNING = "running"
    #: Every job is terminal, and the study was not cancelled.
    FINISHED = "finished"
    #: The study was cancelled (its jobs not yet terminal were cancelled with it).
    CANCELLED = "cancelled"


class Role(StrEnum):
    """What a token may do."""

    #: Submit, read and cancel its own jobs (those submitted with this very token).
    USER = "user"
    #: Call /v1/agent/*: claim jobs, heartbeat, ingest, finish.
    AGENT = "agent"
    #: Everything: every owner's jobs, the agent routes, and token management.
    ADMIN = "admin"


class EventType(StrEnum):
    """The ``type`` of a job's events: the queue's, the agent's and the training loop's."""

    # The queue (service/queue.py): a job's status changes.
    QUEUED = "queued"
    CLAIMED = "claimed"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    CANCEL_REQUESTED = "cancel_requested"
    RELEASED = "released"
    REQUEUED = "requeued"
    # The agent (worker/): an attempt's environment and its end.
    ENVIRONMENT = "environment"
    ATTEMPT_ENDED = "attempt_ended"
    # The agent's health rules (worker/health.py).
    STALLED = "stalled"
    WARNING = "warning"
    # The training loop (xsam.records.FitEvent, reported by rank 0).
    STARTED = FitEvent.STARTED.value
    EPOCH_DONE = FitEvent.EPOCH_DONE.value
    ALPHA_SEARCH = FitEvent.ALPHA_SEARCH.value
    ALPHA_CHECK = FitEvent.ALPHA_CHECK.value
    CHECKPOINT = FitEvent.CHECKPOINT.value
    STOPPED = FitEvent.STOPPED.value
    FINISHED = FitEvent.FINISHED.value


class RunOutcome(StrEnum):
    """How one attempt's Ray run ended, as the agent sees it; `finish_status` maps it on."""

    #: fit() completed on every rank (`FitOutcome.COMPLETED`).
    SUCCEEDED = JobStatus.SUCCEEDED.value
    #: A rank raised; the run's error says what and whether a retry could help.
    FAILED = JobStatus.FAILED.value
    #: The agent stopped the run (`FitOutcome.STOPPED`): cancel, shutdown or a lost lease.
    STOPPED = FitOutcome.STOPPED.value
    #: Ray gave up on the run (a node or process lost): retryable while attempts remain.
    INFRASTRUCTURE = "infrastructure"


#: fit()'s own outcome, as the run's.
RUN_OUTCOME_OF_FIT = {
    FitOutcome.COMPLETED: RunOutcome.SUCCEEDED,
    FitOutcome.STOPPED: RunOutcome.STOPPED,
}


def _words(values: list[str]) -> str:
    # pydantic's own wording for a Literal: "'a', 'b' or 'c'".
    quoted = [repr(v) for v in values]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def literal_of(*members: StrEnum) -> Any:
    """A request field's type that takes one of `members` by value and holds the member.

    Refused with pydantic's ``literal_error`` and message, as a ``Literal`` of the words would
    be, so the 422 body is the same as it was before these enums; a string enum in OpenAPI.
    """
    cls = type(members[0])
    values = [m.value for m in members]
    expected = _words(values)

    def validate(value: Any) -> StrEnum:
        if isinstance(value, str) and value in values:
            return cls(value)
        raise PydanticCustomError(
            "literal_error", "Input should be {expected}", {"expected": expected}
        )

    # Typed as str for pydantic: the member is one, and serializes as its word.
    return Annotated[
        str, PlainValidator(validate), WithJsonSchema({"enum": values, "type": "string"})
    ]


if TYPE_CHECKING:
    FinishStatus = JobStatus
    RoleName = Role
else:
    #: What an agent may finish a job as: the TERMINAL statuses, in the contract's order.
    FinishStatus = literal_of(JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
    #: A role, as a token request names it.
    RoleName = literal_of(*Role)
