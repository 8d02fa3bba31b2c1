"""Response bodies of REST API v1 for jobs, metrics, events, logs, tokens and agents.

The server declares them as its response models and the client (service/client.py) parses its
answers into them: one class per shape, field names are the contract (DESIGN.md).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field, model_serializer

from service.contract.vocabulary import JobStatus, Role

# --- errors ----------------------------------------------------------------------------------


class ErrorPublic(BaseModel):
    detail: str
    code: str


class ValidationErrorPublic(BaseModel):
    """A 422: FastAPI's list of errors, each with the ``loc`` of its field, and a code."""

    detail: list[dict[str, Any]]
    code: str


class ErrorInfo(BaseModel):
    type: str = Field(max_length=200)
    message: str = Field(default="", max_length=20_000)
    #: The failing rank's full Python traceback, when a rank raised.
    traceback: str | None = Field(default=None, max_length=200_000)

    @model_serializer(mode="wrap")
    def _without_absent_traceback(self, handler: Any) -> dict[str, Any]:
        # Errors that carry no traceback (lease expired, bad config) keep their {type, message}.
        data: dict[str, Any] = handler(self)
        if data.get("traceback") is None:
            data.pop("traceback", None)
        return data


# --- jobs ------------------------------------------------------------------------------------


class Progress(BaseModel):
    epoch: int | None = None
    epochs: int | None = None
    step: int | None = None
    steps: int | None = None
    fraction: float | None = None
    eta_s: float | None = None


class MetricPoint(BaseModel):
    step: int
    value: float
    epoch: int | None = None
    time: datetime | None = None


class JobPublic(BaseModel):
    id: int
    name: str | None
    owner: str
    status: JobStatus
    config: dict[str, Any]
    priority: int
    attempt: int
    max_attempts: int
    tags: list[str]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: Progress | None
    latest_metrics: dict[str, MetricPoint]
    error: ErrorInfo | None
    queue_position: int | None
    cancel_requested: bool
    study_id: int | None = None
    cell: str | None = None


class JobsPublic(BaseModel):
    items: list[JobPublic]
    next_cursor: str | None


# --- metrics, events and logs ----------------------------------------------------------------


class BucketPoint(MetricPoint):
    """A downsampled point: `step`/`value` are the bucket's last point."""

    min: float
    max: float
    mean: float
    count: int
    step_min: int
    step_max: int


class MetricsPublic(BaseModel):
    job_id: int
    series: dict[str, list[BucketPoint | MetricPoint]]


class LatestMetricsPublic(BaseModel):
    job_id: int
    metrics: dict[str, MetricPoint]


class EventPublic(BaseModel):
    id: int
    time: datetime
    #: An `EventType` word; read as text, so an event type newer than this client still parses.
    type: str
    message: str
    data: dict[str, Any] | None


class EventsPublic(BaseModel):
    items: list[EventPublic]
    next_after: int


class LogLinePublic(BaseModel):
    id: int
    attempt: int
    rank: int
    time: datetime
    stream: str
    level: str | None
    text: str


class LogsPublic(BaseModel):
    items: list[LogLinePublic]
    next_after: int
    #: Lines of this job the per-job cap has dropped (from the middle: head and tail stay).
    dropped: int


# --- tokens ----------------------------------------------------------------------------------


class TokenPublic(BaseModel):
    id: int
    name: str
    role: Role
    created_at: datetime
    revoked_at: datetime | None


class TokenCreated(BaseModel):
    id: int
    name: str
    role: Role
    token: str


class TokensPublic(BaseModel):
    items: list[TokenPublic]
    #: Always null: every token fits one page (the field keeps the list shape of the contract).
    next_cursor: str | None = None


# --- agent side ------------------------------------------------------------------------------


class HealthRulesPublic(BaseModel):
    """The health rules the agent applies to the run's stream (docs/agent.md, "Health rules")."""

    stall_step_multiple: float
    stall_min_s: float
    alpha_edge_searches: int


class LeasePublic(BaseModel):
    attempt: int
    lease_token: str
    heartbeat_interval_s: float
    health: HealthRulesPublic


class ClaimPublic(BaseModel):
    job: JobPublic
    lease: LeasePublic


class HeartbeatPublic(BaseModel):
    cancel_requested: bool


class IngestPublic(BaseModel):
    received: int
    inserted: int
