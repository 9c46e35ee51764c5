"""The audit log of operator and system actions. Details must never hold secrets."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.store.schema import AuditEntry


async def append_audit(
    session: AsyncSession,
    *,
    actor: str,
    action: str,
    target: str,
    details: dict[str, Any] | None = None,
) -> AuditEntry:
    """Record that ``actor`` did ``action`` to ``target``."""
    entry = AuditEntry(actor=actor, action=action, target=target, details=details or {})
    session.add(entry)
    await session.flush()
    return entry


async def list_audit(
    session: AsyncSession,
    *,
    target: str | None = None,
    actor: str | None = None,
    before_id: int | None = None,
    limit: int = 100,
) -> list[AuditEntry]:
    """Audit entries newest first; page by passing the last id seen as ``before_id``."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if target is not None:
        query = query.where(AuditEntry.target == target)
    if actor is not None:
        query = query.where(AuditEntry.actor == actor)
    if before_id is not None:
        query = query.where(AuditEntry.id < before_id)
    return list(await session.scalars(query))
