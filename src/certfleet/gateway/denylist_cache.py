"""The deny-list in memory: an O(1) check per request, fresh within a poll interval.

Each server process keeps the SHA-256 digests of every deny-listed certificate
as 32-byte `bytes` (a hex string would take twice the memory; a million
entries fit in about 100 MB). It polls the store for entries with an id above
the highest one it has seen, every `poll_every` seconds.

On PostgreSQL an id is taken when a row is inserted, not when it commits, so a
slow transaction can commit id 10 after id 11 was already seen. When ids jump,
the missing ones are remembered for `gap_seconds` and asked for again on each
poll; an entry missed even so is picked up by the full reload every
`reload_every` seconds. Ids that never commit (rolled back, or spent by an
idempotent re-insert) simply expire from the gap list.

Entries are never removed from the store's deny-list, so the reload only adds:
the set is never rebuilt, and polling goes on while a reload pages through.

Each poll also reads the store's change counter (`generation`, raised by
triggers when a device is deleted, moved or changes its certificate, a CA's
status changes or any config changes): what a process keeps in memory about
devices is stale once the counter moved past what it was read with. Polls
are reads that take no write lock (store/hot_path.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from certfleet import background
from certfleet.store.engine import Store

log = logging.getLogger(__name__)

MAX_GAPS = 1000


class DenylistCache:
    """Deny-listed certificate fingerprints of the store, kept in memory and polled."""

    def __init__(
        self,
        store: Store,
        *,
        poll_every: float = 0.25,
        reload_every: float = 60.0,
        gap_seconds: float = 5.0,
        page_size: int = 10000,
    ) -> None:
        self.store = store
        self.poll_every = poll_every
        self.reload_every = reload_every
        self.gap_seconds = gap_seconds
        self.page_size = page_size
        self._digests: set[bytes] = set()
        self._last_id = 0
        self._gaps: dict[int, float] = {}  # entry id -> when to stop asking for it
        self._tasks: list[asyncio.Task[None]] = []
        self.refreshed_at: float | None = None  # time.monotonic() of the last good poll
        self.generation = 0  # the store's change counter at the last good poll

    def __len__(self) -> int:
        return len(self._digests)

    def is_denied(self, digest: bytes) -> bool:
        """True if the certificate with this 32-byte SHA-256 digest is deny-listed."""
        return digest in self._digests

    def add(self, sha256_hex: str) -> None:
        """Deny at once in this process what it just deny-listed in the store itself."""
        self._digests.add(bytes.fromhex(sha256_hex))

    async def reload(self) -> None:
        """Page through the whole deny-list, adding what polling may have missed."""
        after = 0
        while True:
            rows = await self.store.hot_path().denied_page(after, self.page_size)
            self._take(rows)
            if len(rows) < self.page_size:
                return
            after = rows[-1][0]

    async def poll(self) -> None:
        """Add entries committed since the last poll, including late commits of skipped ids."""
        now = time.monotonic()
        self._gaps = {i: until for i, until in self._gaps.items() if until > now}
        while True:
            polled = await self.store.hot_path().denied_poll(
                self._last_id, list(self._gaps), self.page_size
            )
            self._take(polled.rows)
            if len(polled.rows) < self.page_size:
                break
        self.generation = polled.generation
        self.refreshed_at = time.monotonic()

    def _take(self, rows: Iterable[tuple[int, str]]) -> None:
        now = time.monotonic()
        for entry_id, sha256 in rows:
            self._digests.add(bytes.fromhex(sha256))
            self._gaps.pop(entry_id, None)
            if entry_id > self._last_id:
                self._remember_gap(self._last_id + 1, entry_id, now)
                self._last_id = entry_id

    def _remember_gap(self, first: int, end: int, now: float) -> None:
        room = MAX_GAPS - len(self._gaps)
        for missing in range(first, min(end, first + max(room, 0))):
            self._gaps[missing] = now + self.gap_seconds

    async def start(self) -> None:
        """Load everything now, then keep polling and reloading in the background."""
        await self.reload()
        # The first load's holes are old ids, not commits in flight.
        self._gaps.clear()
        await self.poll()
        self._tasks = [
            asyncio.create_task(
                background.repeat(self.poll_every, self.poll, "deny-list poll", log),
                name="denylist-poll",
            ),
            asyncio.create_task(
                background.repeat(self.reload_every, self.reload, "deny-list reload", log),
                name="denylist-reload",
            ),
        ]

    async def stop(self) -> None:
        """Stop the background tasks."""
        for task in self._tasks:
            await background.cancel(task)
        self._tasks = []
