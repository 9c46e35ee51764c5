"""Issued certificates (device and server), looked up by fingerprint."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.store.rows import add_unique, found
from certfleet.store.schema import Certificate


async def add_certificate(
    session: AsyncSession,
    *,
    serial: str,
    sha256: str,
    subject: str,
    pubkey_sha256: str,
    not_before: datetime,
    not_after: datetime,
    cert_pem: str,
    issuer_ca_id: int | None = None,
    device_uuid: str | None = None,
    issued_by_request: str | None = None,
) -> Certificate:
    """Record a certificate; DuplicateError if its fingerprint or issuer+serial exist."""
    row = Certificate(
        serial=serial.lower(),
        sha256=sha256.lower(),
        subject=subject,
        pubkey_sha256=pubkey_sha256.lower(),
        not_before=not_before,
        not_after=not_after,
        cert_pem=cert_pem,
        issuer_ca_id=issuer_ca_id,
        device_uuid=device_uuid,
        issued_by_request=issued_by_request,
    )
    duplicate = f"certificate {sha256} (or serial {serial} from the same CA) is already stored"
    return await add_unique(session, row, duplicate)


async def get_certificate(session: AsyncSession, sha256: str) -> Certificate:
    """The certificate with this SHA-256 fingerprint."""
    query = select(Certificate).where(Certificate.sha256 == sha256.lower())
    return found(await session.scalar(query), f"no certificate with fingerprint {sha256}")


async def list_device_certificates(session: AsyncSession, device_uuid: str) -> list[Certificate]:
    """All certificates of a device, oldest first."""
    query = select(Certificate).where(Certificate.device_uuid == device_uuid)
    return list(await session.scalars(query.order_by(Certificate.id)))


async def devices_with_certificates_from(session: AsyncSession, ca_id: int) -> list[str]:
    """Device uuids holding any certificate issued by CA ``ca_id``."""
    query = (
        select(Certificate.device_uuid)
        .where(Certificate.issuer_ca_id == ca_id, Certificate.device_uuid.is_not(None))
        .distinct()
        .order_by(Certificate.device_uuid)
    )
    return [uuid for uuid in await session.scalars(query) if uuid]
