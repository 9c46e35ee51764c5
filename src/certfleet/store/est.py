"""EST rows: one-time enrollment credentials (HTTP Basic, scrypt hashes) and held requests.

The hash text is ``scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>`` so the cost
can be raised later without breaking stored credentials.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.store.errors import StoreError
from certfleet.store.rows import add_unique, found
from certfleet.store.schema import Certificate, EstCredential, EstPending, PendingStatus, utcnow

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


async def get_credential(session: AsyncSession, username: str) -> EstCredential | None:
    """The credential called ``username``, or None (callers must not say which part was wrong)."""
    return await session.scalar(select(EstCredential).where(EstCredential.username == username))


async def list_credentials(
    session: AsyncSession, *, factory_id: int | None = None
) -> list[EstCredential]:
    """Credentials, oldest first, optionally of one factory."""
    query = select(EstCredential).order_by(EstCredential.id)
    if factory_id is not None:
        query = query.where(EstCredential.factory_id == factory_id)
    return list(await session.scalars(query))


async def claim_credential(session: AsyncSession, credential_id: int) -> bool:
    """Mark a credential used; False if another request used it first."""
    claim = (
        update(EstCredential)
        .where(EstCredential.id == credential_id, EstCredential.used_at.is_(None))
        .values(used_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return (await session.execute(claim)).rowcount == 1


async def enrolled_certificate(
    session: AsyncSession, device_uuid: str, pubkey_sha256: str, operation: str
) -> Certificate | None:
    """The newest certificate EST ``operation`` issued to ``device_uuid`` for this key."""
    query = (
        select(Certificate)
        .where(
            Certificate.device_uuid == device_uuid,
            Certificate.pubkey_sha256 == pubkey_sha256.lower(),
            Certificate.issued_by_request.startswith(f"est:{operation}:", autoescape=True),
        )
        .order_by(Certificate.id.desc())
        .limit(1)
    )
    return await session.scalar(query)


async def add_pending(
    session: AsyncSession,
    *,
    request_sha256: str,
    device_uuid: str | None,
    subject: str,
    csr_pem: str,
) -> EstPending:
    """Hold a request for the operator; DuplicateError if the same request is already held."""
    row = EstPending(
        request_sha256=request_sha256,
        device_uuid=device_uuid,
        subject=subject,
        csr_pem=csr_pem,
    )
    return await add_unique(session, row, "this request is already waiting for approval")


async def get_pending(session: AsyncSession, request_sha256: str) -> EstPending | None:
    """The held request with this fingerprint, or None."""
    query = select(EstPending).where(EstPending.request_sha256 == request_sha256)
    return await session.scalar(query)


async def get_pending_by_id(session: AsyncSession, pending_id: int) -> EstPending:
    """Held request ``pending_id``; NotFoundError if there is none."""
    row = await session.get(EstPending, pending_id)
    return found(row, f"no EST request {pending_id} (see `certfleet est pending list`)")


async def list_pending(
    session: AsyncSession, *, status: PendingStatus | None = None
) -> list[EstPending]:
    """Held requests, oldest first, optionally with one status."""
    query = select(EstPending).order_by(EstPending.id)
    if status is not None:
        query = query.where(EstPending.status == status)
    return list(await session.scalars(query))


async def decide_pending(session: AsyncSession, pending_id: int, approve: bool) -> EstPending:
    """Approve or reject a waiting request; StoreError if it was already decided."""
    row = await get_pending_by_id(session, pending_id)
    if row.status != PendingStatus.PENDING:
        when = row.decided_at.isoformat() if row.decided_at else "earlier"
        raise StoreError(f"EST request {pending_id} was already {row.status} ({when})")
    row.status = PendingStatus.APPROVED if approve else PendingStatus.REJECTED
    row.decided_at = utcnow()
    await session.flush()
    return row


async def set_pending_certificate(session: AsyncSession, row: EstPending, cert_id: int) -> None:
    """Remember the certificate an approved request got, so retries return the same one."""
    row.cert_id = cert_id
    await session.flush()


async def get_certificate_by_id(session: AsyncSession, cert_id: int) -> Certificate:
    """The certificate row ``cert_id`` (an approved request's result)."""
    return found(await session.get(Certificate, cert_id), f"no certificate with id {cert_id}")
