"""/healthz (the process is up), /readyz (the database answers), /metrics (Prometheus)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from service.deps import StateDep

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
def readyz(state: StateDep) -> dict[str, str] | JSONResponse:
    try:
        with state.reader() as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:
        log.warning("readiness check failed: %s", exc)
        return JSONResponse(
            {
                "detail": f"database unreachable: {type(exc).__name__}",
                "code": "database_unreachable",
            },
            status_code=503,
        )
    return {"status": "ready"}


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
def metrics(state: StateDep) -> Response:
    return Response(generate_latest(state.instruments.registry), media_type=CONTENT_TYPE_LATEST)
