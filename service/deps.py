"""FastAPI dependencies: database sessions, settings, and who is calling (`Annotated` style)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from service.auth import Principal, TokenCache, authenticate, hash_secret
from service.contract import Role
from service.errors import PermissionDenied, Unauthenticated
from service.observability import Instruments
from service.queue import LeasePolicy
from service.quotas import SubmitRateLimiter
from service.settings import Settings
from service.storable import find_unstorable


@dataclass
class AppState:
    """What one app instance holds: its settings, engine, session factories and instruments."""

    settings: Settings
    engine: Engine
    writer: sessionmaker[Session]
    reader: sessionmaker[Session]
    policy: LeasePolicy
    instruments: Instruments
    submit_limiter: SubmitRateLimiter
    tokens: TokenCache = field(default_factory=TokenCache)


# Dependencies that do not block are `async def`: FastAPI runs a plain `def` dependency in a
# worker thread, and those hops cost more than a cached get-job itself.


async def get_state(request: Request) -> AppState:
    return request.app.state.xsam


StateDep = Annotated[AppState, Depends(get_state)]


async def get_settings_dep(state: StateDep) -> Settings:
    return state.settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


def get_session(state: StateDep) -> Iterator[Session]:
    """A writing session; the handler opens its one transaction with ``with session.begin():``.

    The transaction must end inside the handler: this dependency's exit runs in another worker
    thread, and a transaction holding SQLite's write lock until then could wait for a free
    thread while every thread waits for that lock.
    """
    with state.writer() as session:
        yield session


async def get_read_session(state: StateDep) -> AsyncIterator[Session]:
    """A reading session (on SQLite it never takes the write lock).

    Opening one does no I/O (the connection is taken on first use, in the handler's thread);
    closing it hands the connection back, which on PostgreSQL's autocommit reader sends nothing
    and on SQLite ends a read transaction in memory.
    """
    with state.reader() as session:
        yield session
        session.rollback()


SessionDep = Annotated[Session, Depends(get_session, scope="function")]
ReadSessionDep = Annotated[Session, Depends(get_read_session, scope="function")]


#: Declares the bearer scheme in the OpenAPI document (the header is parsed below, so that
#: every failure is our own 401 body).
bearer_scheme = HTTPBearer(auto_error=False, description="an xsam_... token")


async def get_principal(
    request: Request,
    state: StateDep,
    _declared: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)] = None,
) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthenticated()
    digest = hash_secret(secret.strip())
    cached = state.tokens.get(digest)
    if cached is not None:
        return cached
    principal = await state.tokens.look_up_once(
        digest, lambda: run_in_threadpool(_look_up, state, secret.strip())
    )
    if principal is None:
        raise Unauthenticated("unknown or revoked token")
    return principal


def _look_up(state: AppState, secret: str) -> Principal | None:
    admin, agent = state.settings.admin_token, state.settings.agent_token
    with state.reader() as session:
        return authenticate(
            session,
            secret,
            admin_secret=admin.get_secret_value() if admin else None,
            agent_secret=agent.get_secret_value() if agent else None,
        )


#: Any valid token; jobs it submits are owned by its name, and it sees only those (admins: all).
OwnerDep = Annotated[Principal, Depends(get_principal)]


async def get_agent(principal: OwnerDep) -> Principal:
    if principal.role not in (Role.AGENT, Role.ADMIN):
        raise PermissionDenied("only agent or admin tokens may call /v1/agent")
    return principal


async def get_admin(principal: OwnerDep) -> Principal:
    if principal.role is not Role.ADMIN:
        raise PermissionDenied("only admin tokens may manage tokens")
    return principal


AgentDep = Annotated[Principal, Depends(get_agent)]
AdminDep = Annotated[Principal, Depends(get_admin)]


async def refuse_unstorable_body(request: Request) -> None:
    """Refuse a JSON body holding what could not be stored and served back (422 at the field).

    An app-wide dependency, so every route's body is checked, whatever its model, before the
    model validates it. FastAPI has already parsed the body (``request.json()`` is cached).
    """
    if request.method not in ("POST", "PUT", "PATCH") or not await request.body():
        return
    if getattr(request.scope.get("endpoint"), "checks_own_body", False):
        return  # the route parses and checks its body itself (service/metrics_body.py)
    try:
        body = await request.json()
    except ValueError:
        return  # not JSON: FastAPI answers that itself
    found = find_unstorable(body)
    if found is not None:
        path, why = found
        raise RequestValidationError(
            [{"type": "unstorable_value", "loc": ("body", *path), "msg": why, "input": None}]
        )
