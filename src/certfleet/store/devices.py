"""Devices: one row per device identity (uuid = certificate CN)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.store.rows import add_unique, found
from certfleet.store.schema import Device, RegisteredVia, utcnow


async def add_device(
    session: AsyncSession,
    uuid: str,
    *,
    factory_id: int,
    registered_via: RegisteredVia,
    group_name: str | None = None,
) -> Device:
    """Register device ``uuid``; DuplicateError if the uuid was ever used."""
    row = Device(
        uuid=uuid, factory_id=factory_id, registered_via=registered_via, group_name=group_name
    )
    return await add_unique(session, row, f"device {uuid} is already registered")


async def get_device(session: AsyncSession, uuid: str, *, include_deleted: bool = False) -> Device:
    """Device ``uuid``; NotFoundError if unknown (or deleted, unless include_deleted)."""
    device = await session.get(Device, uuid)
    if device is not None and device.deleted_at is not None and not include_deleted:
        device = None
    return found(device, f"no device {uuid}")


async def soft_delete_device(session: AsyncSession, uuid: str) -> Device:
    """Mark device ``uuid`` deleted; its rows and history stay."""
    device = await get_device(session, uuid)
    device.deleted_at = utcnow()
    await session.flush()
    return device


async def list_devices(
    session: AsyncSession,
    *,
    factory_id: int | None = None,
    group_name: str | None = None,
    include_deleted: bool = False,
    after_uuid: str = "",
    limit: int = 1000,
) -> list[Device]:
    """Devices ordered by uuid; page by passing the last uuid seen as ``after_uuid``."""
    query = select(Device).where(Device.uuid > after_uuid).order_by(Device.uuid).limit(limit)
    if factory_id is not None:
        query = query.where(Device.factory_id == factory_id)
    if group_name is not None:
        query = query.where(Device.group_name == group_name)
    if not include_deleted:
        query = query.where(Device.deleted_at.is_(None))
    return list(await session.scalars(query))
