"""Operator API tokens: create (shown once), list (never the secret), revoke."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from certfleet.store import audit, tokens
from certfleet.store.engine import Store
from certfleet.store.errors import StoreError
from certfleet.store.schema import ApiToken, utcnow

ACTOR = "cli"
SCOPES = ("register", "read", "rotate", "pki-admin")
MAX_NAME_LENGTH = 128


@dataclass(frozen=True)
class TokenInfo:
    """A stored token without its secret or hash."""

    id: int
    name: str
    scopes: list[str]
    created_at: dt.datetime
    expires_at: dt.datetime
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None

    @classmethod
    def of(cls, row: ApiToken) -> TokenInfo:
        """From a store row."""
        return cls(
            row.id,
            row.name,
            list(row.scopes),
            row.created_at,
            row.expires_at,
            row.revoked_at,
            row.last_used_at,
        )

    @property
    def state(self) -> str:
        """revoked, expired or active."""
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.expires_at <= utcnow() else "active"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields, with the state."""
        return {
            "id": self.id,
            "name": self.name,
            "scopes": self.scopes,
            "state": self.state,
            "created_at": _iso(self.created_at),
            "expires_at": _iso(self.expires_at),
            "revoked_at": _iso(self.revoked_at),
            "last_used_at": _iso(self.last_used_at),
        }


@dataclass(frozen=True)
class NewToken:
    """A token just made; the plain token exists only here, never in the store."""

    info: TokenInfo
    token: str = field(repr=False)


async def create_token(
    store: Store, name: str, scopes: list[str], expires_in: dt.timedelta
) -> NewToken:
    """Create a scoped, expiring token; only its SHA-256 is stored."""
    name = _checked_name(name)
    scopes = _checked_scopes(scopes)
    if expires_in <= dt.timedelta(0):
        raise StoreError("a token must expire in the future: give a positive --expires-in")
    expires_at = utcnow() + expires_in
    async with store.transaction() as session:
        row, plain = await tokens.create_token(session, name, scopes=scopes, expires_at=expires_at)
        await audit.append_audit(
            session,
            actor=ACTOR,
            action="token.create",
            target=f"token:{row.id}",
            details={"name": name, "scopes": scopes, "expires_at": expires_at.isoformat()},
        )
    return NewToken(TokenInfo.of(row), plain)


async def list_tokens(store: Store) -> list[TokenInfo]:
    """Every token, oldest first."""
    async with store.transaction() as session:
        return [TokenInfo.of(row) for row in await tokens.list_tokens(session)]


async def revoke_token(store: Store, token_id: int) -> tuple[TokenInfo, bool]:
    """Revoke a token at once; returns it and whether it was already revoked."""
    async with store.transaction() as session:
        # The row as it was before, to tell a repeated revoke from a new one.
        before = await session.get(ApiToken, token_id)
        already = before is not None and before.revoked_at is not None
        row = await tokens.revoke_token(session, token_id)
        if not already:
            await audit.append_audit(
                session,
                actor=ACTOR,
                action="token.revoke",
                target=f"token:{row.id}",
                details={"name": row.name},
            )
        return TokenInfo.of(row), already


def _checked_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise StoreError(
            f"token name must be 1 to {MAX_NAME_LENGTH} printable characters, e.g. factory-line-3"
        )
    return name


def _checked_scopes(scopes: list[str]) -> list[str]:
    allowed = ", ".join(SCOPES)
    if not scopes:
        raise StoreError(f"give at least one --scope; allowed scopes: {allowed}")
    for scope in scopes:
        if scope not in SCOPES:
            raise StoreError(f"unknown scope {scope!r}; allowed scopes: {allowed}")
    return list(dict.fromkeys(scopes))


def _iso(moment: dt.datetime | None) -> str | None:
    return moment.isoformat() if moment else None
