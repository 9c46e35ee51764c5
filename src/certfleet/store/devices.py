"""Devices: one row per device identity (uuid = certificate CN)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
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


async def lock_device(session: AsyncSession, uuid: str) -> Device:
    """Device ``uuid`` (not deleted), locked until the transaction ends (PostgreSQL).

    For a check-then-write that must not interleave with the device's own
    changes; SQLite transactions are serialized anyway.
    """
    device = await session.scalar(
        select(Device)
        .where(Device.uuid == uuid, Device.deleted_at.is_(None))
        .with_for_update()
        .execution_options(populate_existing=True)
    )
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


async def set_next_key(
    session: AsyncSession, uuid: str, pubkey_pem: str, pubkey_sha256: str
) -> Device:
    """Record the key the device will use next and lock its config until it connects with it."""
    device = await get_device(session, uuid)
    device.next_pubkey_pem = pubkey_pem
    device.next_pubkey_sha256 = pubkey_sha256.lower()
    device.config_locked = True
    await session.flush()
    return device


async def withdraw_next_key(session: AsyncSession, uuid: str, pubkey_sha256: str) -> bool:
    """Forget the announced next key `pubkey_sha256` and unlock the config.

    False (and nothing changed) if that key is not the one announced now.
    """
    query = (
        update(Device)
        .where(Device.uuid == uuid)
        .where(Device.next_pubkey_sha256 == pubkey_sha256.lower())
        .values(next_pubkey_pem=None, next_pubkey_sha256=None, config_locked=False)
        .execution_options(synchronize_session="fetch")
    )
    result = await session.execute(query)
    return result.rowcount == 1


async def switch_current_certificate(
    session: AsyncSession, uuid: str, *, old_cert_id: int | None, new_cert_id: int
) -> bool:
    """Make ``new_cert_id`` current, clear the next key and unlock the config.

    Only if the current certificate is still ``old_cert_id``: False means
    another transaction switched first and nothing was changed.
    """
    query = (
        update(Device)
        .where(Device.uuid == uuid)
        .where(
            Device.current_cert_id.is_(None)
            if old_cert_id is None
            else Device.current_cert_id == old_cert_id
        )
        .values(
            current_cert_id=new_cert_id,
            next_pubkey_pem=None,
            next_pubkey_sha256=None,
            config_locked=False,
        )
        .execution_options(synchronize_session="fetch")
    )
    result = await session.execute(query)
    return result.rowcount == 1


async def mark_seen(session: AsyncSession, uuid: str, when: datetime) -> None:
    """Set when the device was last seen, without loading it."""
    await session.execute(
        update(Device)
        .where(Device.uuid == uuid)
        .values(last_seen_at=when)
        .execution_options(synchronize_session=False)
    )
