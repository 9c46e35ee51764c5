"""The deny-list: certificate fingerprints that may no longer connect.

Server processes keep the fingerprints in memory and poll ``denied_since``.
On PostgreSQL ids are handed out at insert time, so a transaction that commits
late can add an id lower than one already seen; pollers should also reload
the whole list now and then.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.protocol import DENYLIST_ADDED, rfc3339
from certfleet.store import outbox
from certfleet.store.rows import found, upsert_insert
from certfleet.store.schema import DenylistEntry, utcnow


async def add_denied(
    session: AsyncSession,
    cert_sha256: str,
    *,
    reason: str,
    serial: str | None = None,
    device_uuid: str | None = None,
) -> DenylistEntry:
    """Deny a certificate; if it is already denied, the first entry is kept and returned."""
    sha256 = cert_sha256.lower()
    values = dict(cert_sha256=sha256, reason=reason, serial=serial, device_uuid=device_uuid)
    insert = upsert_insert(session, DenylistEntry.__table__).values(**values)
    await session.execute(insert.on_conflict_do_nothing(index_elements=["cert_sha256"]))
    query = select(DenylistEntry).where(DenylistEntry.cert_sha256 == sha256)
    return found(await session.scalar(query), f"deny-list entry {sha256} vanished")


async def deny_with_event(
    session: AsyncSession,
    cert_sha256: str,
    *,
    reason: str,
    serial: str | None = None,
    device_uuid: str | None = None,
) -> tuple[DenylistEntry, bool]:
    """`add_denied`, plus a DENYLIST_ADDED event if the certificate was not denied before.

    One event per new entry, whoever denies (an operator, a key change), so consumers
    see every deny-list entry exactly once. Returns the entry and whether it is new.
    """
    new = not await is_denied(session, cert_sha256)
    entry = await add_denied(
        session, cert_sha256, reason=reason, serial=serial, device_uuid=device_uuid
    )
    if new:
        payload = {
            "sha256": entry.cert_sha256,
            "serial": serial,
            "uuid": device_uuid,
            "reason": reason,
            "time": rfc3339(utcnow()),
        }
        await outbox.append_event(session, DENYLIST_ADDED, payload, device_uuid=device_uuid)
    return entry, new


async def is_denied(session: AsyncSession, cert_sha256: str) -> bool:
    """True if the certificate with this fingerprint is deny-listed."""
    query = select(DenylistEntry.id).where(DenylistEntry.cert_sha256 == cert_sha256.lower())
    return await session.scalar(query) is not None


async def list_denied(
    session: AsyncSession, *, device_uuid: str | None = None, limit: int = 1000
) -> list[DenylistEntry]:
    """Deny-list entries, newest first, optionally of one device."""
    query = select(DenylistEntry).order_by(DenylistEntry.id.desc()).limit(limit)
    if device_uuid is not None:
        query = query.where(DenylistEntry.device_uuid == device_uuid)
    return list(await session.scalars(query))


async def count_denied(session: AsyncSession) -> int:
    """How many certificates are deny-listed."""
    return await session.scalar(select(func.count()).select_from(DenylistEntry)) or 0


async def denied_since(
    session: AsyncSession, after_id: int, *, limit: int = 10000
) -> list[DenylistEntry]:
    """Entries with id > ``after_id`` in id order; pass 0 to load from the start."""
    query = select(DenylistEntry).where(DenylistEntry.id > after_id)
    return list(await session.scalars(query.order_by(DenylistEntry.id).limit(limit)))


async def denied_fingerprints(
    session: AsyncSession, after_id: int, *, limit: int = 10000
) -> list[tuple[int, str]]:
    """(id, fingerprint) pairs with id > ``after_id`` in id order: a light full load."""
    query = select(DenylistEntry.id, DenylistEntry.cert_sha256).where(DenylistEntry.id > after_id)
    rows = await session.execute(query.order_by(DenylistEntry.id).limit(limit))
    return [(entry_id, sha256) for entry_id, sha256 in rows]


async def denied_among(session: AsyncSession, ids: Iterable[int]) -> list[tuple[int, str]]:
    """(id, fingerprint) of the entries whose id is in ``ids`` (committed ones only)."""
    wanted = list(ids)
    if not wanted:
        return []
    query = select(DenylistEntry.id, DenylistEntry.cert_sha256).where(DenylistEntry.id.in_(wanted))
    return [(entry_id, sha256) for entry_id, sha256 in await session.execute(query)]
