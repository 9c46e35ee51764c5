"""Devices' last_seen_at, written in batches: a request queues, a background task writes.

A check-in answered from memory must not cost a write transaction: with
devices polling every few minutes and last_seen_at kept to the minute, nearly
every check-in would take the write lock just for this. So each process
queues the times and writes them once a second in one transaction; a device
shows up as seen up to that second later. A failed write keeps the times for
the next round.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

from certfleet import background
from certfleet.store.engine import Store
from certfleet.store.hot_rows import Seen

log = logging.getLogger(__name__)


class SeenWriter:
    """Queued last_seen_at times of one process, written every `every` seconds."""

    def __init__(self, store: Store, every: float = 1.0) -> None:
        self.store = store
        self.every = every
        self._queued: dict[str, dt.datetime] = {}
        self._task: asyncio.Task[None] | None = None

    def mark(self, device_uuid: str, at: dt.datetime) -> None:
        """Queue: device `device_uuid` was seen at `at`."""
        self._queued[device_uuid] = at

    async def flush(self) -> None:
        """Write what is queued now."""
        if not self._queued:
            return
        queued, self._queued = self._queued, {}
        # In uuid order: two workers writing overlapping batches then lock the
        # rows in the same order and cannot deadlock (PostgreSQL).
        seen = [Seen(device_uuid, queued[device_uuid]) for device_uuid in sorted(queued)]
        try:
            await self.store.hot_path().mark_seen(seen)
        except BaseException:
            # Newer marks made meanwhile win over the ones that failed.
            self._queued = {**queued, **self._queued}
            raise

    async def start(self) -> None:
        """Write in the background until stop()."""
        self._task = asyncio.create_task(
            background.repeat(self.every, self.flush, "writing last-seen times", log),
            name="last-seen-writer",
        )

    async def stop(self) -> None:
        """Stop the background task and write what is left (a failure is logged, not raised)."""
        await background.cancel(self._task)
        self._task = None
        try:
            await self.flush()
        except Exception as exc:  # shutting down: nothing would retry
            log.warning("%d last-seen times not written at shutdown: %r", len(self._queued), exc)
