"""The errors of the REST client: one exception per kind of answer, chosen by the server's code.

The server's codes are stable (service/errors.py); a client that meets a code it does not know yet
still raises the class of the HTTP status.
"""

from __future__ import annotations

from typing import Any

import httpx


class ApiError(Exception):
    """The service answered with an error (or could not be reached: status 0)."""

    def __init__(self, status: int, code: str, detail: Any) -> None:
        self.status = status
        self.code = code
        self.detail = detail
        super().__init__(f"{status} {code}: {detail}")


class Unauthorized(ApiError):
    """No token, or an unknown or revoked one (401)."""


class Forbidden(ApiError):
    """The token's role may not do that (403)."""


class NotFound(ApiError):
    """No such job, study, token or artifact, or not yours (404)."""


class Conflict(ApiError):
    """The request conflicts with the state (409): e.g. cancelling a finished job."""


class LeaseLost(Conflict):
    """The agent's lease is gone: stop the run and report nothing more."""


class ServiceUnreachable(ApiError):
    """The service could not be reached or did not answer in time."""


#: The server's stable error codes (service/errors.py), each to the exception it raises here.
_BY_CODE: dict[str, type[ApiError]] = {
    "unauthorized": Unauthorized,
    "forbidden": Forbidden,
    "priority_not_allowed": Forbidden,
    "job_not_found": NotFound,
    "study_not_found": NotFound,
    "token_not_found": NotFound,
    "artifact_not_found": NotFound,
    "not_found": NotFound,
    "lease_lost": LeaseLost,
    "job_finished": Conflict,
    "study_finished": Conflict,
    "idempotency_key_reused": Conflict,
    "token_name_taken": Conflict,
}
#: A code this client does not know yet (a newer server) still gets its status's class.
_BY_STATUS: dict[int, type[ApiError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
}


def error_for(response: httpx.Response) -> ApiError:
    """The exception an error response stands for, chosen by its ``code``."""
    try:
        body = response.json()
        detail, code = body.get("detail", response.text), body.get("code", "error")
    except (ValueError, AttributeError):
        detail = response.text or response.reason_phrase
        code = f"http_{response.status_code}"
    cls = _BY_CODE.get(code) or _BY_STATUS.get(response.status_code, ApiError)
    return cls(response.status_code, code, detail)
