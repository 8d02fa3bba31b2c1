"""Request bodies of REST API v1 (DESIGN.md), and a stored job as its Job body.

The response bodies are the contract's (service/contract/): the client parses into the same
classes. Field names are the contract.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    model_validator,
)

from service.auth import RESERVED_NAMES
from service.contract import (
    ErrorInfo,
    ErrorPublic,
    FinishStatus,
    JobPublic,
    JobStatus,
    MetricPoint,
    Progress,
    Role,
    RoleName,
    ValidationErrorPublic,
)
from service.db.models import Job
from service.storable import find_unstorable
from xsam.config import TrainConfig

#: Largest value of a 64-bit column (ids, steps) and of a 32-bit one (epochs): a larger number
#: in a request is a 422, not a database overflow.
MAX_BIGINT = 2**63 - 1
MAX_INT = 2**31 - 1
TAG_PATTERN = r"^[A-Za-z0-9_.:/=+-]+$"
Tag = Annotated[str, Field(min_length=1, max_length=64, pattern=TAG_PATTERN)]


def as_utc(value: datetime) -> datetime:
    # Stored as naive UTC: a time that has no UTC equivalent (year 1 at +05:00) is bad input.
    try:
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    except OverflowError:
        raise ValueError("time is out of range once converted to UTC") from None


UTCTime = Annotated[datetime, AfterValidator(as_utc)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Body(_In):
    """A whole request body: checked once, up front, for what no backend could store."""

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        # Over HTTP the app's body check (service.deps) has already refused these with the
        # exact field in ``loc``; this keeps the models safe wherever else they are used.
        found = find_unstorable(data)
        if found is not None:
            path, why = found
            where = ".".join(str(p) for p in path)
            raise ValueError(f"{where}: {why}" if where else why)
        return data


# --- jobs -----------------------------------------------------------------------------------


class JobCreate(_Body):
    """A job submission: the training config (validated by TrainConfig) and queue options."""

    name: str | None = Field(default=None, max_length=200)
    config: TrainConfig
    priority: int = Field(default=0, ge=-1000, le=1000, description="higher is claimed first")
    max_attempts: int = Field(default=3, ge=1, le=100)
    tags: list[Tag] = Field(default_factory=list, max_length=32)


def public_job(
    job: Job,
    *,
    latest_metrics: dict[str, dict[str, Any]] | None = None,
    queue_position: int | None = None,
) -> JobPublic:
    """The Job body of a stored job."""
    return JobPublic(
        id=job.id,
        name=job.name,
        owner=job.owner,
        status=JobStatus(job.status),
        config=job.config,
        priority=job.priority,
        attempt=job.attempt,
        max_attempts=job.max_attempts,
        tags=job.tags,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        progress=progress_of(job),
        latest_metrics={
            k: MetricPoint.model_validate(v) for k, v in (latest_metrics or {}).items()
        },
        error=ErrorInfo(**job.error) if job.error else None,
        queue_position=queue_position,
        cancel_requested=job.cancel_requested,
        study_id=job.study_id,
        cell=job.cell,
    )


def progress_of(job: Job) -> Progress | None:
    """The stored progress plus fraction done and an ETA from the time elapsed since start."""
    raw = job.progress
    if not raw:
        return None
    p = Progress(**{k: raw.get(k) for k in ("epoch", "epochs", "step", "steps")})
    if p.steps and p.step is not None:
        p.fraction = min(max(p.step / p.steps, 0.0), 1.0)
    elif p.epochs and p.epoch is not None:
        p.fraction = min(max(p.epoch / p.epochs, 0.0), 1.0)
    reported = raw.get("reported_at")
    if p.fraction and job.started_at and reported:
        elapsed = (datetime.fromisoformat(reported) - job.started_at).total_seconds()
        if elapsed >= 0:
            p.eta_s = round(elapsed * (1 - p.fraction) / p.fraction, 3)
    return p


# --- tokens ----------------------------------------------------------------------------------


def _not_reserved(name: str) -> str:
    if name.lower() in RESERVED_NAMES:
        raise ValueError(f"{name!r} is reserved for the service's own tokens")
    return name


class TokenCreate(_Body):
    name: Annotated[
        str,
        Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.@-]+$"),
        AfterValidator(_not_reserved),
    ]
    role: RoleName = Role.USER


# --- agent side ------------------------------------------------------------------------------


class Capacity(_In):
    # Compared with the jobs' FLOAT and INTEGER columns in the claim query: bounded to fit.
    cpus: float = Field(ge=0, le=MAX_INT, allow_inf_nan=False)
    gpus: int = Field(ge=0, le=MAX_INT)


class ClaimRequest(_Body):
    agent_id: str = Field(min_length=1, max_length=200)
    capacity: Capacity


class ProgressIn(_In):
    epoch: int | None = Field(default=None, ge=0, le=MAX_INT)
    epochs: int | None = Field(default=None, ge=0, le=MAX_INT)
    step: int | None = Field(default=None, ge=0, le=MAX_BIGINT)
    steps: int | None = Field(default=None, ge=0, le=MAX_BIGINT)


class HeartbeatRequest(_Body):
    lease_token: str = Field(max_length=64)
    progress: ProgressIn | None = None


class FinishRequest(_Body):
    lease_token: str = Field(max_length=64)
    status: FinishStatus
    error: ErrorInfo | None = None


class ReleaseRequest(_Body):
    lease_token: str = Field(max_length=64)
    reason: str | None = Field(default=None, max_length=2000)


class PointIn(_In):
    name: str = Field(min_length=1, max_length=128)
    step: int = Field(ge=0, le=MAX_BIGINT)
    # NaN/inf are refused: SQLite cannot store NaN; report a diverged run as an event/failure.
    value: float = Field(allow_inf_nan=False)
    epoch: int | None = Field(default=None, ge=0, le=MAX_INT)
    time: UTCTime | None = None


class MetricsIngest(_Body):
    lease_token: str = Field(max_length=64)
    points: list[PointIn]


class EventIn(_In):
    type: str = Field(min_length=1, max_length=64)
    message: str = Field(default="", max_length=20_000)
    data: dict[str, Any] | None = None
    key: str | None = Field(default=None, max_length=200)
    time: UTCTime | None = None


class EventsIngest(_Body):
    lease_token: str = Field(max_length=64)
    events: list[EventIn]


class LogLineIn(_In):
    rank: int = Field(ge=0, le=MAX_INT)
    seq: int = Field(ge=0, le=MAX_BIGINT)
    time: UTCTime | None = None
    stream: Literal["stdout", "stderr", "log"]
    level: str | None = Field(default=None, max_length=16)
    text: str = Field(max_length=20_000)


class LogsIngest(_Body):
    lease_token: str = Field(max_length=64)
    lines: list[LogLineIn]


# --- error bodies, for the OpenAPI document ---------------------------------------------------


_ERROR_DESCRIPTIONS = {
    400: "Malformed request (e.g. an invalid cursor, or a body nested too deep to parse)",
    401: "No bearer token, or an unknown or revoked one",
    403: "The token's role may not do that",
    404: "No such resource, or not the caller's",
    409: "Conflicts with the current state (finished job, lost lease, reused key, taken name)",
    413: "The body or the batch is too large",
    429: "A quota or the submit rate is exceeded (rate: see Retry-After)",
    503: "The database is busy or unreachable; retry (see Retry-After)",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, each with the ``{detail, code}`` body."""
    out: dict[int | str, dict[str, Any]] = {
        s: {"model": ErrorPublic, "description": _ERROR_DESCRIPTIONS[s]} for s in statuses
    }
    out[422] = {"model": ValidationErrorPublic, "description": "A field is invalid (see loc)"}
    return out
