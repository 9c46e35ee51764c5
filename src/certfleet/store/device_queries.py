"""Operator views of devices: filtered, paged listings with each device's current certificate.

Read-only queries for the admin API and the CLI; the device-facing hot paths
(EST, gateway check-in) do not use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import ColumnElement, Select, and_, exists, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.store.schema import (
    Ca,
    Certificate,
    DenylistEntry,
    Device,
    Factory,
    Update,
    UpdateEvent,
)


class DeviceState(StrEnum):
    """A device's state as the operator sees it; the first that applies wins."""

    DELETED = "deleted"
    NO_CERT = "no-cert"
    DENIED = "denied"
    EXPIRED = "expired"
    ROTATING = "rotating"
    ACTIVE = "active"


@dataclass(frozen=True)
class DeviceFilter:
    """What a listing keeps; None means no condition."""

    group: str | None = None
    state: DeviceState | None = None
    # Current certificate expires in [now, expiring_before).
    expiring_before: datetime | None = None


@dataclass(frozen=True)
class DeviceRow:
    """A device with its factory, current certificate and that certificate's issuer."""

    device: Device
    factory: str
    cert: Certificate | None
    issuer: Ca | None
    denied: bool


def _denied() -> ColumnElement[bool]:
    return exists().where(DenylistEntry.cert_sha256 == Certificate.sha256)


def _base() -> Select:
    return (
        select(Device, Factory.name, Certificate, Ca, _denied().label("denied"))
        .join(Factory, Factory.id == Device.factory_id)
        .outerjoin(Certificate, Certificate.id == Device.current_cert_id)
        .outerjoin(Ca, Ca.id == Certificate.issuer_ca_id)
    )


def _state_condition(state: DeviceState, now: datetime) -> ColumnElement[bool]:
    """SQL for one state, mirroring the precedence of `state_of`."""
    if state == DeviceState.DELETED:
        return Device.deleted_at.is_not(None)
    live = [Device.deleted_at.is_(None)]
    if state == DeviceState.NO_CERT:
        return and_(*live, Device.current_cert_id.is_(None))
    live += [Device.current_cert_id.is_not(None)]
    if state == DeviceState.DENIED:
        return and_(*live, _denied())
    live += [~_denied()]
    if state == DeviceState.EXPIRED:
        return and_(*live, Certificate.not_after <= now)
    live += [Certificate.not_after > now]
    locked = Device.config_locked.is_(True)
    return and_(*live, locked if state == DeviceState.ROTATING else ~locked)


def state_of(row: DeviceRow, now: datetime) -> DeviceState:
    """The state of a listed device at ``now``."""
    if row.device.deleted_at is not None:
        return DeviceState.DELETED
    if row.cert is None:
        return DeviceState.NO_CERT
    if row.denied:
        return DeviceState.DENIED
    if row.cert.not_after <= now:
        return DeviceState.EXPIRED
    return DeviceState.ROTATING if row.device.config_locked else DeviceState.ACTIVE


def _filtered(query: Select, wanted: DeviceFilter, now: datetime) -> Select:
    if wanted.group is not None:
        query = query.where(Device.group_name == wanted.group)
    if wanted.state is not None:
        query = query.where(_state_condition(wanted.state, now))
    else:
        query = query.where(Device.deleted_at.is_(None))
    if wanted.expiring_before is not None:
        query = query.where(
            Certificate.not_after >= now, Certificate.not_after < wanted.expiring_before
        )
    return query


async def list_device_rows(
    session: AsyncSession, wanted: DeviceFilter, now: datetime, *, after_uuid: str, limit: int
) -> list[DeviceRow]:
    """Devices matching ``wanted`` in uuid order, after ``after_uuid`` (keyset paging).

    Deleted devices are listed only when asked for by state.
    """
    query = _filtered(_base(), wanted, now).where(Device.uuid > after_uuid)
    rows = await session.execute(query.order_by(Device.uuid).limit(limit))
    return [DeviceRow(*row) for row in rows]


async def get_device_row(session: AsyncSession, uuid: str) -> DeviceRow | None:
    """One device (deleted ones too) with its current certificate, or None."""
    row = (await session.execute(_base().where(Device.uuid == uuid))).first()
    return None if row is None else DeviceRow(*row)


async def count_by_state(session: AsyncSession, now: datetime) -> dict[DeviceState, int]:
    """How many devices are in each state at ``now`` (one count per state)."""
    counts = {}
    for state in DeviceState:
        query = (
            select(func.count())
            .select_from(Device)
            .outerjoin(Certificate, Certificate.id == Device.current_cert_id)
            .where(_state_condition(state, now))
        )
        counts[state] = int(await session.scalar(query) or 0)
    return counts


async def count_device_certificates(session: AsyncSession, uuid: str) -> int:
    """How many certificates the store holds for a device, current or not."""
    query = select(func.count()).select_from(Certificate).where(Certificate.device_uuid == uuid)
    return int(await session.scalar(query) or 0)


async def latest_update(
    session: AsyncSession, uuid: str, *, prefixes: tuple[str, ...] = ()
) -> tuple[Update, UpdateEvent | None] | None:
    """A device's newest update whose correlation id starts with one of ``prefixes`` (any
    update if none are given), and its last event."""
    query = select(Update).where(Update.device_uuid == uuid)
    if prefixes:
        query = query.where(
            or_(*(Update.correlation_id.startswith(p, autoescape=True) for p in prefixes))
        )
    update = await session.scalar(query.order_by(Update.id.desc()).limit(1))
    if update is None:
        return None
    last = select(UpdateEvent).where(UpdateEvent.update_id == update.id)
    return update, await session.scalar(last.order_by(UpdateEvent.id.desc()).limit(1))


async def list_updates_page(
    session: AsyncSession, uuid: str, *, before_id: int | None, limit: int
) -> list[Update]:
    """A device's updates newest first, those older than ``before_id`` (keyset paging)."""
    query = select(Update).where(Update.device_uuid == uuid)
    if before_id is not None:
        query = query.where(Update.id < before_id)
    return list(await session.scalars(query.order_by(Update.id.desc()).limit(limit)))


async def update_event_counts(session: AsyncSession, update_ids: list[int]) -> dict[int, int]:
    """Number of events of each update."""
    if not update_ids:
        return {}
    query = (
        select(UpdateEvent.update_id, func.count())
        .where(UpdateEvent.update_id.in_(update_ids))
        .group_by(UpdateEvent.update_id)
    )
    return {update_id: int(n) for update_id, n in await session.execute(query)}
