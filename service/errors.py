"""Domain errors: the docstring is the default message, ``code`` is stable for clients.

They are translated to HTTP in exactly one place, `HTTP_STATUS` (used by service/app.py).
"""

from __future__ import annotations


class ServiceError(Exception):
    """The request cannot be served."""

    code = "error"

    def __init__(self, message: str | None = None) -> None:
        self.message = message or (self.__doc__ or self.code).strip()
        super().__init__(self.message)


class BadRequest(ServiceError):
    """The request is malformed."""

    code = "bad_request"


class InvalidCursor(BadRequest):
    """The pagination cursor is not one this server handed out."""

    code = "invalid_cursor"


class Unauthenticated(ServiceError):
    """A valid bearer token is required (Authorization: Bearer <token>)."""

    code = "unauthorized"


class PermissionDenied(ServiceError):
    """This token's role may not do that."""

    code = "forbidden"


class PriorityNotAllowed(PermissionDenied):
    """This token's role may not ask for that priority."""

    code = "priority_not_allowed"


class QuotaExceeded(ServiceError):
    """A quota is used up; the message says which and what frees it."""

    code = "quota_exceeded"


class RateLimited(ServiceError):
    """Too many requests; retry after ``retry_after`` seconds (the Retry-After header)."""

    code = "rate_limited"

    def __init__(self, message: str | None = None, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class JobNotFound(ServiceError):
    """No such job."""

    code = "job_not_found"


class StudyNotFound(ServiceError):
    """No such study."""

    code = "study_not_found"


class StudyInvalid(ServiceError):
    """A cell of the study is not a valid training config."""

    code = "invalid_study"


class UnknownPath(StudyInvalid):
    """A dotted path names no field of the training config."""

    code = "unknown_path"


class StudyTooLarge(ServiceError):
    """The study expands into more jobs than this server accepts in one study."""

    code = "study_too_large"


class StudyAlreadyFinished(ServiceError):
    """Every job of the study has already finished."""

    code = "study_finished"


class TokenNotFound(ServiceError):
    """No such token."""

    code = "token_not_found"


class ArtifactNotFound(ServiceError):
    """The job has no such artifact."""

    code = "artifact_not_found"


class UiAssetNotFound(ServiceError):
    """The dashboard has no such file."""

    code = "not_found"


class JobAlreadyFinished(ServiceError):
    """The job has already finished."""

    code = "job_finished"


class IdempotencyKeyReused(ServiceError):
    """This Idempotency-Key was already used for a different request; use a new key."""

    code = "idempotency_key_reused"


class TokenNameTaken(ServiceError):
    """A token that is not revoked already has this name; revoke it first or pick another."""

    code = "token_name_taken"


class LeaseLost(ServiceError):
    """The lease is not (or no longer) held: the job was requeued, reclaimed or finished."""

    code = "lease_lost"


class PayloadTooLarge(ServiceError):
    """The request body is too large."""

    code = "payload_too_large"


#: The one translation table from domain errors to HTTP statuses (most specific class first).
HTTP_STATUS: dict[type[ServiceError], int] = {
    InvalidCursor: 400,
    BadRequest: 400,
    Unauthenticated: 401,
    PermissionDenied: 403,
    JobNotFound: 404,
    StudyNotFound: 404,
    TokenNotFound: 404,
    ArtifactNotFound: 404,
    UiAssetNotFound: 404,
    JobAlreadyFinished: 409,
    IdempotencyKeyReused: 409,
    TokenNameTaken: 409,
    StudyAlreadyFinished: 409,
    LeaseLost: 409,
    PayloadTooLarge: 413,
    StudyInvalid: 422,
    StudyTooLarge: 422,
    QuotaExceeded: 429,
    RateLimited: 429,
}


def http_status(error: ServiceError) -> int:
    for cls in type(error).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500
