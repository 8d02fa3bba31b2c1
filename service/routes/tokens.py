"""/v1/tokens: create, list and revoke bearer tokens (admin only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response
from sqlalchemy import select

from service.auth import create_token
from service.contract import Role, TokenCreated, TokenPublic, TokensPublic
from service.db.engine import db_now
from service.db.models import Token
from service.deps import AdminDep, ReadSessionDep, SessionDep, StateDep
from service.errors import TokenNameTaken, TokenNotFound
from service.schemas import MAX_BIGINT, TokenCreate, error_responses

router = APIRouter(
    prefix="/v1/tokens", tags=["tokens"], responses=error_responses(400, 401, 403, 413, 503)
)


def _public(token: Token) -> TokenPublic:
    return TokenPublic(
        id=token.id,
        name=token.name,
        role=Role(token.role),
        created_at=token.created_at,
        revoked_at=token.revoked_at,
    )


@router.post("", status_code=201, response_model=TokenCreated, responses=error_responses(409))
def create(body: TokenCreate, session: SessionDep, admin: AdminDep) -> TokenCreated:
    """A new token; its secret is in this reply only.

    A name held by a token that is not revoked is refused (409), so a name shown as a job's
    owner is one person; ownership itself follows the token, so a new token with a revoked
    token's name does not see that token's jobs.
    """
    with session.begin():
        held = select(Token.id).where(Token.name == body.name, Token.revoked_at.is_(None))
        if session.scalars(held).first() is not None:
            raise TokenNameTaken(f"an active token is already named {body.name!r}")
        token, secret = create_token(session, body.name, Role(body.role))
        return TokenCreated(id=token.id, name=token.name, role=Role(token.role), token=secret)


@router.get("", response_model=TokensPublic)
def list_tokens(session: ReadSessionDep, admin: AdminDep) -> TokensPublic:
    """Every token, revoked ones included (never their secrets)."""
    return TokensPublic(
        items=[_public(t) for t in session.scalars(select(Token).order_by(Token.id))]
    )


@router.delete("/{token_id}", status_code=204, responses=error_responses(404))
def revoke(
    token_id: Annotated[int, Path(ge=0, le=MAX_BIGINT)],
    session: SessionDep,
    admin: AdminDep,
    state: StateDep,
) -> Response:
    """Revoke a token; it is refused from the next request on (by other API processes, within
    a second: they trust a token for that long after looking it up)."""
    with session.begin():
        token = session.get(Token, token_id)
        if token is None:
            raise TokenNotFound(f"token {token_id} not found")
        if token.revoked_at is None:
            token.revoked_at = db_now(session)
    state.tokens.clear()
    return Response(status_code=204)
