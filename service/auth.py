"""Bearer tokens: roles, hashing, creation, lookup.

A token is ``xsam_<random>``; the database keeps only its SHA-256, so a leaked database leaks no
usable token, and lookup by hash needs no constant-time comparison. A process keeps the
principals it found for `TOKEN_CACHE_TTL_S` (one second; `TokenCache`), so a busy API does not
pay a query per request, and a revocation takes effect within that second in every process.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.contract import Role
from service.db.engine import db_now
from service.db.models import Token


@dataclass(frozen=True)
class Principal:
    """Who is calling: the name their jobs show, their role, and the token they hold."""

    name: str
    role: Role
    token_id: int | None = None

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    @property
    def owner_key(self) -> str:
        """The identity that owns what this caller submits: its token's id (names may repeat,
        ids never do), or ``env:<name>`` for a secret from the API's environment."""
        return f"token:{self.token_id}" if self.token_id is not None else f"env:{self.name}"


#: Token names the service gives its own principals (the admin token file, XSAM_ADMIN_TOKEN,
#: XSAM_AGENT_TOKEN): refused for tokens created over the API.
RESERVED_NAMES = frozenset({"admin", "agent"})


#: How long a process trusts a token it looked up: the most a revocation may take to bite.
TOKEN_CACHE_TTL_S = 1.0


class TokenCache:
    """Principals by secret hash, each trusted for `ttl_s` seconds after its lookup.

    Only valid tokens are kept (an unknown secret costs a lookup each time, so random secrets
    cannot fill the cache); at most `max_entries`, the whole cache dropped when full.

    Lookups of one secret that overlap share one query (`look_up_once`): when an entry expires
    under load, every request in flight with that token misses at once, and without this each
    of them (64 at 64 connections) would run its own query.
    """

    def __init__(self, ttl_s: float = TOKEN_CACHE_TTL_S, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()
        self._in_flight: dict[str, asyncio.Future[Principal | None]] = {}

    def get(self, digest: str) -> Principal | None:
        entry = self._entries.get(digest)
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    def put(self, digest: str, principal: Principal) -> None:
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[digest] = (time.monotonic() + self.ttl_s, principal)

    async def look_up_once(
        self, digest: str, look_up: Callable[[], Awaitable[Principal | None]]
    ) -> Principal | None:
        """`look_up()`'s answer, cached when valid; callers that arrive while a lookup of the same
        digest runs wait for that one. Call from the event loop only."""
        pending = self._in_flight.get(digest)
        if pending is None:
            pending = asyncio.ensure_future(self._look_up_and_put(digest, look_up))
            self._in_flight[digest] = pending
            pending.add_done_callback(lambda _: self._in_flight.pop(digest, None))
        # Shielded: one caller's disconnect must not cancel the lookup the others wait for.
        return await asyncio.shield(pending)

    async def _look_up_and_put(
        self, digest: str, look_up: Callable[[], Awaitable[Principal | None]]
    ) -> Principal | None:
        principal = await look_up()
        if principal is not None:
            self.put(digest, principal)
        return principal

    def clear(self) -> None:
        """Forget every token (this process's revocations bite at once)."""
        with self._lock:
            self._entries.clear()
            # Later callers must not join a lookup that began before the revocation.
            self._in_flight.clear()


def new_secret() -> str:
    return "xsam_" + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(session: Session, name: str, role: Role) -> tuple[Token, str]:
    """Store a new token; returns (row, secret) — the secret is never stored."""
    secret = new_secret()
    token = Token(
        name=name, role=role.value, token_hash=hash_secret(secret), created_at=db_now(session)
    )
    session.add(token)
    session.flush()
    return token, secret


def ensure_token(session: Session, name: str, role: Role, secret: str) -> Token:
    """Register an existing `secret` (e.g. the admin token file) unless it is already known."""
    digest = hash_secret(secret)
    token = session.scalars(select(Token).where(Token.token_hash == digest)).first()
    if token is None:
        token = Token(name=name, role=role.value, token_hash=digest, created_at=db_now(session))
        session.add(token)
        session.flush()
    return token


def authenticate(
    session: Session,
    secret: str,
    *,
    admin_secret: str | None,
    agent_secret: str | None = None,
) -> Principal | None:
    """The principal for `secret`, or None when it is unknown or revoked.

    `admin_secret` and `agent_secret` (XSAM_ADMIN_TOKEN, XSAM_AGENT_TOKEN) are accepted as
    admin and agent tokens without a row in the tokens table.
    """
    if admin_secret and hmac.compare_digest(secret.encode(), admin_secret.encode()):
        return Principal(name="admin", role=Role.ADMIN)
    if agent_secret and hmac.compare_digest(secret.encode(), agent_secret.encode()):
        return Principal(name="agent", role=Role.AGENT)
    token = session.scalars(
        select(Token).where(Token.token_hash == hash_secret(secret), Token.revoked_at.is_(None))
    ).first()
    if token is None:
        return None
    return Principal(name=token.name, role=Role(token.role), token_id=token.id)


def write_secret_file(path: Path, secret: str) -> None:
    """Write `secret` to `path` readable by its owner only (mode 0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def provision_admin_token(session: Session, path: Path) -> str:
    """The admin secret kept at `path` (mode 0600), created on first start and registered here.

    A file left from an earlier database is registered again, so the CLI keeps working.
    """
    if path.is_file():
        secret = path.read_text().strip()
        if secret:
            ensure_token(session, "admin", Role.ADMIN, secret)
            return secret
    _, secret = create_token(session, "admin", Role.ADMIN)
    write_secret_file(path, secret)
    return secret
