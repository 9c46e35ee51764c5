"""Certificate authorities of a factory (root, device CAs, TLS server certs)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.store.rows import add_unique, found
from certfleet.store.schema import Ca, CaKind, CaStatus, utcnow


async def add_ca(
    session: AsyncSession,
    *,
    factory_id: int,
    name: str,
    kind: CaKind,
    cert_pem: str,
    sha256: str,
    subject: str,
    not_before: datetime,
    not_after: datetime,
    ski: str | None = None,
    key_ref: str | None = None,
) -> Ca:
    """Record a CA certificate; ``key_ref`` is where its key lives, never the key."""
    row = Ca(
        factory_id=factory_id,
        name=name,
        kind=kind,
        cert_pem=cert_pem,
        sha256=sha256.lower(),
        subject=subject,
        not_before=not_before,
        not_after=not_after,
        ski=ski,
        key_ref=key_ref,
    )
    return await add_unique(session, row, f"CA '{name}' or one with fingerprint {sha256} exists")


async def list_cas(
    session: AsyncSession, factory_id: int, *, kind: CaKind | None = None
) -> list[Ca]:
    """The CAs of a factory, oldest first, optionally of one kind."""
    query = select(Ca).where(Ca.factory_id == factory_id).order_by(Ca.id)
    if kind is not None:
        query = query.where(Ca.kind == kind)
    return list(await session.scalars(query))


async def get_ca(session: AsyncSession, sha256: str) -> Ca:
    """The CA whose certificate has this SHA-256 fingerprint."""
    row = await session.scalar(select(Ca).where(Ca.sha256 == sha256.lower()))
    return found(row, f"no CA with fingerprint {sha256}")


async def get_ca_by_name(session: AsyncSession, factory_id: int, name: str) -> Ca:
    """The CA called ``name`` in a factory."""
    query = select(Ca).where(Ca.factory_id == factory_id, Ca.name == name)
    return found(await session.scalar(query), f"no CA named '{name}' in this factory")


async def set_ca_status(session: AsyncSession, ca_id: int, status: CaStatus) -> Ca:
    """Enable, disable or revoke a CA and record when that happened."""
    ca = found(await session.get(Ca, ca_id), f"no CA with id {ca_id}")
    ca.status = status
    ca.status_changed_at = utcnow()
    await session.flush()
    return ca


async def replace_ca_certificate(
    session: AsyncSession,
    ca_id: int,
    *,
    cert_pem: str,
    sha256: str,
    subject: str,
    not_before: datetime,
    not_after: datetime,
    ski: str | None = None,
) -> Ca:
    """Point a CA row at a re-issued certificate (e.g. a renewed TLS server cert)."""
    ca = found(await session.get(Ca, ca_id), f"no CA with id {ca_id}")
    ca.cert_pem, ca.sha256, ca.subject = cert_pem, sha256.lower(), subject
    ca.not_before, ca.not_after, ca.ski = not_before, not_after, ski
    ca.status_changed_at = utcnow()
    await session.flush()
    return ca
