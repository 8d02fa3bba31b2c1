"""/v1/tokens: create, list and revoke bearer tokens (admin only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response
from sqlalchemy import select

from service.auth import Role, create_token
from service.db.engine import db_now
from service.db.models import Token
from service.deps import AdminDep, ReadSessionDep, SessionDep, StateDep
from service.errors import TokenNotFound
from service.schemas import MAX_BIGINT, TokenCreate, TokenCreated, TokenPublic, TokensPublic

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])


def _public(token: Token) -> TokenPublic:
    return TokenPublic(
        id=token.id,
        name=token.name,
        role=token.role,
        created_at=token.created_at,
        revoked_at=token.revoked_at,
    )


@router.post("", status_code=201, response_model=TokenCreated)
def create(body: TokenCreate, session: SessionDep, admin: AdminDep) -> TokenCreated:
    """A new token; its secret is in this reply only."""
    with session.begin():
        token, secret = create_token(session, body.name, Role(body.role))
        return TokenCreated(id=token.id, name=token.name, role=token.role, token=secret)


@router.get("", response_model=TokensPublic)
def list_tokens(session: ReadSessionDep, admin: AdminDep) -> TokensPublic:
    """Every token, revoked ones included (never their secrets)."""
    return TokensPublic(
        items=[_public(t) for t in session.scalars(select(Token).order_by(Token.id))]
    )


@router.delete("/{token_id}", status_code=204)
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
