"""Device updates (rotations, OTA) and the step events devices report for them.

A correlation id (e.g. a rotation id ``certs-<unix time>``) may be shared by
many devices, so an update is keyed by device and correlation id.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.store.rows import found, upsert_insert
from certfleet.store.schema import Update, UpdateEvent, UpdateStatus, utcnow


async def start_update(
    session: AsyncSession, device_uuid: str, correlation_id: str, *, kind: str
) -> Update:
    """The update ``correlation_id`` of a device, created if it is new."""
    values = dict(device_uuid=device_uuid, correlation_id=correlation_id, kind=kind)
    insert = upsert_insert(session, Update.__table__).values(**values)
    await session.execute(
        insert.on_conflict_do_nothing(index_elements=["device_uuid", "correlation_id"])
    )
    return await get_update(session, device_uuid, correlation_id)


async def get_update(session: AsyncSession, device_uuid: str, correlation_id: str) -> Update:
    """The update ``correlation_id`` of a device."""
    query = select(Update).where(
        Update.device_uuid == device_uuid, Update.correlation_id == correlation_id
    )
    return found(
        await session.scalar(query), f"device {device_uuid} has no update {correlation_id}"
    )


async def list_updates(session: AsyncSession, device_uuid: str) -> list[Update]:
    """The updates of a device, newest first."""
    query = select(Update).where(Update.device_uuid == device_uuid).order_by(Update.id.desc())
    return list(await session.scalars(query))


async def set_update_status(session: AsyncSession, update_id: int, status: UpdateStatus) -> Update:
    """Set the outcome of an update."""
    row = found(await session.get(Update, update_id), f"no update with id {update_id}")
    row.status = status
    row.updated_at = utcnow()
    await session.flush()
    return row


async def add_update_event(
    session: AsyncSession,
    update_id: int,
    *,
    event_id: str,
    event_type: str,
    device_time: datetime | None = None,
    success: bool | None = None,
    target_name: str | None = None,
    version: str | None = None,
    details: str | None = None,
) -> bool:
    """Store one reported event; False if this event id was already stored (a resend)."""
    insert = upsert_insert(session, UpdateEvent.__table__).values(
        update_id=update_id,
        event_id=event_id,
        event_type=event_type,
        device_time=device_time,
        success=success,
        target_name=target_name,
        version=version,
        details=details,
    )
    result = await session.execute(
        insert.on_conflict_do_nothing(index_elements=["update_id", "event_id"])
    )
    return result.rowcount == 1


async def list_update_events(session: AsyncSession, update_id: int) -> list[UpdateEvent]:
    """The events of an update in the order they were received."""
    query = select(UpdateEvent).where(UpdateEvent.update_id == update_id)
    return list(await session.scalars(query.order_by(UpdateEvent.id)))
