"""One-time EST enrollment credentials (HTTP Basic), stored as scrypt hashes.

The hash text is ``scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>`` so the cost
can be raised later without breaking stored credentials.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.store.rows import add_unique
from certfleet.store.schema import EstCredential

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


def _scrypt(secret: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, n=n, r=r, p=p, dklen=32)


def hash_secret(secret: str) -> str:
    """A salted scrypt hash of ``secret`` with its parameters."""
    salt = os.urandom(16)
    digest = _scrypt(secret, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def check_secret(secret: str, stored: str) -> bool:
    """True if ``secret`` matches a hash made by hash_secret (constant-time compare)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        expected = base64.b64decode(digest)
        actual = _scrypt(secret, base64.b64decode(salt), int(n), int(r), int(p))
    except ValueError:
        return False
    return scheme == "scrypt" and hmac.compare_digest(actual, expected)


async def add_est_credential(
    session: AsyncSession,
    *,
    factory_id: int,
    username: str,
    secret: str,
    bound_subject: str,
    expires_at: datetime,
) -> EstCredential:
    """Store a credential that may enroll ``bound_subject`` once; only the hash is kept."""
    row = EstCredential(
        factory_id=factory_id,
        username=username,
        secret_hash=hash_secret(secret),
        bound_subject=bound_subject,
        expires_at=expires_at,
    )
    return await add_unique(session, row, f"EST username '{username}' is taken")
