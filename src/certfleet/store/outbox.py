"""The event outbox: written in the same transaction as the change it describes.

A delivery worker fetches undelivered events in id order, sends them, and marks
them delivered or schedules a retry.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

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
