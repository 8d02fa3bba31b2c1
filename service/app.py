"""The FastAPI application factory, error translation, and the periodic lease reaper."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import metrics_body, queue
from service.body_limit import BodySizeLimit
from service.db.engine import make_engine, make_sessionmakers, run_in_transaction
from service.deps import AppState, refuse_unstorable_body
from service.errors import RateLimited, ServiceError, http_status
from service.observability import Instruments, RequestTimer
from service.queue import LeasePolicy
from service.quotas import SubmitRateLimiter
from service.routes import agent, health, jobs, studies, tokens, ui
from service.settings import Settings, get_settings
from service.storable import printable
from xsam.config import locate_error

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",  # e.g. a body nested too deep for the JSON parser
    404: "not_found",
    405: "method_not_allowed",
    401: "unauthorized",
    403: "forbidden",
}


def reap_once(state: AppState) -> int:
    """One pass of the lease reaper; returns how many jobs it requeued, failed or cancelled."""
    return len(run_in_transaction(state.writer, lambda s: queue.requeue_expired(s, state.policy)))


async def _reap_forever(state: AppState) -> None:
    # A lease is judged only by time in which this process could hear its heartbeats: for one
    # lease timeout after the process starts (the API was down before: an agent's beats went
    # nowhere) and after a pass that failed (the database was unreachable: so were the beats),
    # no lease expires. Otherwise restarting the API or the database would requeue every
    # running job, each at the cost of an attempt, while its agent is alive and training.
    grace_until = time.monotonic() + state.settings.lease_s
    while True:
        await asyncio.sleep(state.settings.reaper_interval_s)
        if time.monotonic() < grace_until:
            continue
        try:
            await anyio.to_thread.run_sync(reap_once, state)
        except Exception:
            log.exception("lease reaper pass failed; retrying next interval")
            grace_until = time.monotonic() + state.settings.lease_s


def _error(status: int, detail: str, code: str) -> JSONResponse:
    return JSONResponse({"detail": detail, "code": code}, status_code=status)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    response = _error(http_status(exc), exc.message, exc.code)
    if isinstance(exc, RateLimited):
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    return JSONResponse(
        {"detail": str(exc.detail), "code": code},
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


def _json_safe(value: Any) -> Any:
    # An echoed input may hold inf or NaN, which strict JSON cannot carry, or lone surrogates,
    # which UTF-8 cannot: written out as text, they can always be rendered.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {printable(str(k)): _json_safe(v) for k, v in value.items()}
    return value


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    try:
        return _json_safe(jsonable_encoder(exc.errors()))
    except Exception:
        # An input that cannot be echoed (nested too deep, or stranger): leave it out.
        bare = [{k: v for k, v in e.items() if k not in ("input", "ctx")} for e in exc.errors()]
        return _json_safe(jsonable_encoder(bare))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    try:
        errors = _validation_errors(exc)
        for item in errors:
            # A cross-field check names its field in its message, not in loc: so that every
            # error points at a field, loc gets it (the message stays as pydantic wrote it).
            loc = item.get("loc")
            if isinstance(loc, list):
                item["loc"] = list(locate_error(loc, str(item.get("msg", "")))[0])
        return JSONResponse({"detail": errors, "code": "validation_error"}, status_code=422)
    except Exception:
        # The error handler must never fail itself: a 422 without the details beats a 500.
        log.exception("could not render a validation error")
        return _error(422, "the request is invalid", "validation_error")


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OperationalError)
    log.warning("database error on %s %s: %s", request.method, request.url.path, exc.orig)
    response = _error(503, "the database is busy or unreachable; retry", "database_unavailable")
    response.headers["Retry-After"] = "1"
    return response


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for `settings` (default: `get_settings()`); the schema must be migrated."""
    settings = settings or get_settings()
    engine = make_engine(
        settings.url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        busy_timeout_s=settings.sqlite_busy_timeout_s,
    )
    writer, reader = make_sessionmakers(engine)

    def job_counts() -> dict[str, int]:
        with reader() as session:
            return queue.job_counts(session)

    state = AppState(
        settings=settings,
        engine=engine,
        writer=writer,
        reader=reader,
        policy=LeasePolicy(
            heartbeat_interval_s=settings.heartbeat_interval_s,
            lease_timeout_s=settings.lease_s,
            retry_backoff_s=settings.retry_backoff_s,
            retry_backoff_max_s=settings.retry_backoff_max_s,
        ),
        instruments=Instruments(job_counts),
        submit_limiter=SubmitRateLimiter(settings.submit_rate_per_minute),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reaper = asyncio.create_task(_reap_forever(state)) if settings.run_reaper else None
        try:
            yield
        finally:
            if reaper is not None:
                reaper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reaper
            engine.dispose()

    app = FastAPI(
        title="XSAM training service",
        version="1",
        summary="Submit, watch and cancel XSAM training jobs; agents claim and run them.",
        lifespan=lifespan,
        dependencies=[Depends(refuse_unstorable_body)],
    )
    app.state.xsam = state
    build_openapi = app.openapi
    # The metrics ingest route parses its own body (service/metrics_body.py): its model joins
    # the document's components here, once, when the document is first built.
    app.openapi = lambda: (  # type: ignore[method-assign]
        app.openapi_schema or metrics_body.document_body(build_openapi())
    )
    for router in (
        jobs.router,
        studies.router,
        agent.router,
        tokens.router,
        health.router,
        ui.router,
    ):
        app.include_router(router)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(OperationalError, _database_error)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestTimer, instruments=state.instruments)
    return app
