"""The event outbox: written in the same transaction as the change it describes.

A delivery worker fetches undelivered events in id order, sends them, and marks
them delivered or schedules a retry.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Select, exists, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased
from sqlalchemy.sql.elements import ColumnElement

from certfleet.store.schema import OutboxEvent, utcnow


async def append_event(
    session: AsyncSession, topic: str, payload: dict[str, Any], *, device_uuid: str | None = None
) -> OutboxEvent:
    """Queue an event; it becomes visible to the worker when the transaction commits."""
    event = OutboxEvent(topic=topic, payload=payload, device_uuid=device_uuid)
    session.add(event)
    await session.flush()
    return event


async def fetch_undelivered(
    session: AsyncSession, *, limit: int = 100, now: datetime | None = None
) -> list[OutboxEvent]:
    """Undelivered events due by ``now``, oldest first.

    On PostgreSQL the rows stay locked until the transaction ends and other
    workers skip them, so several workers never send the same event at once.
    """
    query = (
        select(OutboxEvent)
        .where(OutboxEvent.delivered_at.is_(None), OutboxEvent.next_attempt_at <= (now or utcnow()))
        .order_by(OutboxEvent.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return list(await session.scalars(query))


async def mark_delivered(session: AsyncSession, event_ids: Iterable[int]) -> None:
    """Record that these events were delivered."""
    ids = list(event_ids)
    query = update(OutboxEvent).where(OutboxEvent.id.in_(ids)).values(delivered_at=utcnow())
    await session.execute(query)


async def mark_failed(session: AsyncSession, event_id: int, *, retry_at: datetime) -> None:
    """Count a failed delivery and schedule the next attempt."""
    query = (
        update(OutboxEvent)
        .where(OutboxEvent.id == event_id)
        .values(attempts=OutboxEvent.attempts + 1, next_attempt_at=retry_at)
    )
    await session.execute(query)


async def undelivered_backlog(session: AsyncSession) -> tuple[int, datetime | None]:
    """How many events are undelivered, and when the oldest of them was queued (None: none)."""
    query = select(func.count(), func.min(OutboxEvent.created_at)).where(
        OutboxEvent.delivered_at.is_(None)
    )
    count, oldest = (await session.execute(query)).one()
    return count, oldest


def _behind_earlier_undelivered() -> ColumnElement[bool]:
    """True for an event of a device that still has an older undelivered event."""
    earlier = aliased(OutboxEvent)
    return exists().where(
        earlier.device_uuid == OutboxEvent.device_uuid,
        earlier.delivered_at.is_(None),
        earlier.id < OutboxEvent.id,
    )


async def fetch_device_heads(
    session: AsyncSession, *, limit: int = 100, now: datetime | None = None
) -> list[OutboxEvent]:
    """Due undelivered events that are the oldest undelivered one of their device.

    Events without a device are not ordered and always count as heads. On
    PostgreSQL the rows stay locked until the transaction ends and other
    workers skip them; while a head is undelivered no one else can take a
    later event of its device, because that event is not a head.
    """
    query = (
        select(OutboxEvent)
        .where(
            OutboxEvent.delivered_at.is_(None),
            OutboxEvent.next_attempt_at <= (now or utcnow()),
            ~_behind_earlier_undelivered(),
        )
        .order_by(OutboxEvent.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return list(await session.scalars(query))


async def fetch_followers(
    session: AsyncSession, heads: Iterable[OutboxEvent], *, limit: int = 100
) -> list[OutboxEvent]:
    """Undelivered events queued behind ``heads`` on the same devices, oldest first.

    Due or not: the caller stops each device at its first event not yet due.
    Locked on PostgreSQL like the heads.
    """
    head_list = list(heads)
    devices = {head.device_uuid for head in head_list if head.device_uuid is not None}
    if not devices or limit <= 0:
        return []
    query = (
        select(OutboxEvent)
        .where(
            OutboxEvent.delivered_at.is_(None),
            OutboxEvent.device_uuid.in_(devices),
            OutboxEvent.id.not_in([head.id for head in head_list]),
        )
        .order_by(OutboxEvent.id)
        .limit(limit)
        # Only the holder of a device's head can reach these rows; SKIP LOCKED
        # avoids waiting in the one odd case (see docs of DeliveryLoop) where
        # two workers both think they own a device.
        .with_for_update(skip_locked=True)
    )
    return list(await session.scalars(query))


async def latest_events(
    session: AsyncSession,
    *,
    limit: int = 20,
    topic: str | None = None,
    device_uuid: str | None = None,
) -> list[OutboxEvent]:
    """The newest ``limit`` events (delivered or not) matching the filters, oldest first."""
    query = _filtered(topic, device_uuid).order_by(OutboxEvent.id.desc()).limit(limit)
    return list(reversed(list(await session.scalars(query))))


async def events_after(
    session: AsyncSession,
    after_id: int,
    *,
    limit: int = 1000,
    topic: str | None = None,
    device_uuid: str | None = None,
) -> list[OutboxEvent]:
    """Events with an id above ``after_id`` matching the filters, oldest first."""
    query = _filtered(topic, device_uuid).where(OutboxEvent.id > after_id)
    return list(await session.scalars(query.order_by(OutboxEvent.id).limit(limit)))


def _filtered(topic: str | None, device_uuid: str | None) -> Select[tuple[OutboxEvent]]:
    query = select(OutboxEvent)
    if topic is not None:
        query = query.where(OutboxEvent.topic == topic)
    if device_uuid is not None:
        query = query.where(OutboxEvent.device_uuid == device_uuid)
    return query
