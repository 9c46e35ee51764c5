"""Bearer tokens and scopes of the admin API.

Tokens are the ones `certfleet tokens create` makes (only their SHA-256 is
stored). Scopes nest: `pki-admin` may do everything `rotate` may, and
`rotate` everything `read` may; `register` is for device registration only
and opens nothing here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from aiohttp import web

from certfleet.store import tokens
from certfleet.store.engine import Store
from certfleet.store.errors import TokenRejectedError

from .errors import ApiError, forbidden, unauthorized

READ = "read"
ROTATE = "rotate"
PKI_ADMIN = "pki-admin"
# Which token scopes satisfy a route's scope.
GRANTED_BY = {
    READ: frozenset({READ, ROTATE, PKI_ADMIN}),
    ROTATE: frozenset({ROTATE, PKI_ADMIN}),
    PKI_ADMIN: frozenset({PKI_ADMIN}),
}
SCOPE_ATTRIBUTE = "api_scope"
MAX_TOKEN_LENGTH = 256

H = TypeVar("H", bound=Callable[..., Awaitable[web.StreamResponse]])


@dataclass(frozen=True)
class Caller:
    """Who made a request: the token's id and name (never the token)."""

    token_id: int
    name: str
    scopes: frozenset[str]

    @property
    def actor(self) -> str:
        """How audit entries name this caller."""
        return f"api:token:{self.token_id}:{self.name}"


def requires(scope: str) -> Callable[[H], H]:
    """Mark a handler (e.g. of an extra route) with the scope it needs."""
    if scope not in GRANTED_BY:
        raise ValueError(f"unknown scope {scope!r}")

    def mark(handler: H) -> H:
        setattr(handler, SCOPE_ATTRIBUTE, scope)
        return handler

    return mark


def default_scope(method: str) -> str:
    """The scope of a route that names none: reading needs read, anything else pki-admin."""
    return READ if method in ("GET", "HEAD") else PKI_ADMIN


def bearer_token(request: web.Request) -> str:
    """The token of `Authorization: Bearer <token>`; 401 if missing or malformed."""
    header = request.headers.get("Authorization")
    if not header:
        raise unauthorized(
            "this endpoint needs 'Authorization: Bearer <token>' (see certfleet tokens create)"
        )
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise unauthorized("the Authorization header must be 'Bearer <token>'")
    if len(token) > MAX_TOKEN_LENGTH or not token.isascii() or not token.isprintable():
        raise unauthorized("unknown API token; check it was copied whole or create a new one")
    return token


class _Undo(Exception):
    """Rolls back the token check's own write (its last use)."""


async def authenticate(store: Store, token: str) -> Caller:
    """The live token's caller; 401 if it is unknown, expired or revoked.

    Nothing is written: a refused request must leave the store as it was, so
    the use is recorded by `record_use` once the answer is a success.
    """
    try:
        async with store.transaction() as session:
            row = await tokens.verify_token(session, token)
            caller = Caller(row.id, row.name, frozenset(row.scopes))
            raise _Undo
    except TokenRejectedError as exc:
        raise unauthorized(str(exc)) from exc
    except _Undo:
        return caller


async def record_use(store: Store, token: str) -> None:
    """Set the token's last use to now (a token revoked meanwhile is left alone)."""
    try:
        async with store.transaction() as session:
            await tokens.verify_token(session, token)
    except TokenRejectedError:
        pass


def check_scope(caller: Caller, scope: str, what: str) -> None:
    """403 unless one of the caller's scopes grants ``scope``."""
    if caller.scopes & GRANTED_BY[scope]:
        return
    held = ", ".join(sorted(caller.scopes)) or "none"
    raise forbidden(
        f"{what} needs a token with scope '{scope}' (or one above it); "
        f"token '{caller.name}' has: {held}"
    )


__all__ = ["ApiError", "Caller", "requires"]
