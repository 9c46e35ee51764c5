"""Operator API tokens. Only a SHA-256 of each token is stored.

The plain token is returned once by ``create_token`` and must never be logged.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.store.errors import TokenRejectedError
from certfleet.store.rows import found
from certfleet.store.schema import ApiToken, utcnow

# A recognisable prefix lets secret scanners spot leaked tokens.
TOKEN_PREFIX = "cft_"


def token_digest(plain: str) -> str:
    """The hex SHA-256 stored for a token."""
    return hashlib.sha256(plain.encode()).hexdigest()


async def create_token(
    session: AsyncSession, name: str, *, scopes: list[str], expires_at: datetime
) -> tuple[ApiToken, str]:
    """Create a token; returns its row and the plain token, which is not kept anywhere."""
    plain = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(
        name=name, token_sha256=token_digest(plain), scopes=scopes, expires_at=expires_at
    )
    session.add(row)
    await session.flush()
    return row, plain


async def verify_token(session: AsyncSession, plain: str) -> ApiToken:
    """The live token matching ``plain``; TokenRejectedError if unknown, expired or revoked."""
    digest = token_digest(plain)
    row = await session.scalar(select(ApiToken).where(ApiToken.token_sha256 == digest))
    # The lookup matched a hash of the token; compare again in constant time anyway.
    if row is None or not hmac.compare_digest(row.token_sha256, digest):
        raise TokenRejectedError("unknown API token; check it was copied whole or create a new one")
    now = utcnow()
    if row.revoked_at is not None:
        raise TokenRejectedError(f"API token '{row.name}' was revoked; create a new one")
    if row.expires_at <= now:
        raise TokenRejectedError(f"API token '{row.name}' expired; create a new one")
    row.last_used_at = now
    await session.flush()
    return row


async def revoke_token(session: AsyncSession, token_id: int) -> ApiToken:
    """Revoke a token; revoking twice keeps the first time."""
    row = found(await session.get(ApiToken, token_id), f"no API token with id {token_id}")
    row.revoked_at = row.revoked_at or utcnow()
    await session.flush()
    return row


async def list_tokens(session: AsyncSession) -> list[ApiToken]:
    """All tokens (hashes only), oldest first."""
    return list(await session.scalars(select(ApiToken).order_by(ApiToken.id)))
