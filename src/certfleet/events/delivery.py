"""The delivery loop: outbox events to every sink, at least once, in order per device.

Ordering. A batch holds the *heads* (each device's oldest undelivered event,
if due) and then the events queued behind them. Each device's events go out
one at a time in id order; the first failure stops that device until its
retry time, while other devices carry on. Events without a device are not
ordered. Ids are taken at insert, so two transactions that write events for
the same device at the same time may commit against id order; writers of one
device should serialize (e.g. on the device row) for the order to be exact.

Claiming. On PostgreSQL the transaction that fetched the batch (FOR UPDATE
SKIP LOCKED) stays open while the batch is delivered, and the marks are
written in it. Other loops skip the locked rows and cannot take a later event
of a locked device (it is not a head), so no event is sent by two loops at
once. If the process dies, PostgreSQL drops the connection and rolls back:
the rows are free again with no lease to expire or tune. The price is one
connection per loop, idle in transaction for at most ``batch_seconds`` plus
one sink timeout. On SQLite a write transaction locks the whole file, which
would stall every other writer while webhooks answer, so the batch is fetched
and marked in two short transactions; run one loop per SQLite database.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import takewhile

from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.events.backoff import Backoff
from certfleet.events.names import Envelope
from certfleet.events.sink import DeliveryError, Sink
from certfleet.store import outbox
from certfleet.store.engine import Store
from certfleet.store.schema import OutboxEvent, utcnow

log = logging.getLogger(__name__)

ERROR_PAUSE = 5.0
# In-memory bookkeeping per event; only an aid, the store holds the truth.
MAX_TRACKED = 10_000


@dataclass(frozen=True)
class Failure:
    """The latest failed attempt of an event that will be retried."""

    attempts: int
    error: str
    retry_at: datetime


@dataclass
class _Outcome:
    delivered: list[int] = field(default_factory=list)
    failed: dict[int, Failure] = field(default_factory=dict)


class DeliveryLoop:
    """Sends outbox events to sinks; all state lives in the store."""

    def __init__(
        self,
        store: Store,
        sinks: Iterable[Sink],
        *,
        poll_interval: float = 0.5,
        batch: int = 100,
        backoff: Backoff | None = None,
        concurrency: int = 16,
        batch_seconds: float = 30.0,
    ) -> None:
        self.store = store
        self.sinks = list(sinks)
        if not self.sinks:
            # With nothing to send to, every event would be marked delivered unseen.
            raise ValueError("a delivery loop needs at least one sink")
        self.poll_interval = poll_interval
        self.batch = batch
        self.backoff = backoff or Backoff()
        self.concurrency = concurrency
        self.batch_seconds = batch_seconds
        self.failures: dict[int, Failure] = {}
        self.delivered_count = 0
        # Sinks that took an event whose other sinks failed: not sent to them again.
        self._accepted: dict[int, set[int]] = {}
        self._holds_locks = store.engine.dialect.name == "postgresql"

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set, then close the sinks."""
        try:
            while not stop.is_set():
                pause = await self._round()
                if pause:
                    await _wait(stop, pause)
        finally:
            await self.close()

    async def run_once(self) -> int:
        """Deliver one batch; return how many events every sink accepted."""
        if self._holds_locks:
            async with self.store.transaction() as tx:
                outcome = await self._deliver(await self._claim(tx))
                await self._record(tx, outcome)
        else:
            async with self.store.transaction() as tx:
                events = await self._claim(tx)
            outcome = await self._deliver(events)
            async with self.store.transaction() as tx:
                await self._record(tx, outcome)
        self._remember(outcome)
        return len(outcome.delivered)

    async def close(self) -> None:
        """Close every sink's connections."""
        for sink in self.sinks:
            await sink.close()

    async def _round(self) -> float:
        try:
            delivered = await self.run_once()
        except Exception:
            log.exception("event delivery round failed; next try in %.0f s", ERROR_PAUSE)
            return ERROR_PAUSE
        # Something went out, so more may be waiting: go again at once.
        return 0.0 if delivered else self.poll_interval

    async def _claim(self, tx: AsyncSession) -> list[OutboxEvent]:
        heads = await outbox.fetch_device_heads(tx, limit=self.batch, now=utcnow())
        followers = await outbox.fetch_followers(tx, heads, limit=self.batch - len(heads))
        return sorted(heads + followers, key=lambda event: event.id)

    async def _deliver(self, events: list[OutboxEvent]) -> _Outcome:
        outcome = _Outcome()
        deadline = time.monotonic() + self.batch_seconds
        slots = asyncio.Semaphore(self.concurrency)

        async def one_device(chain: list[OutboxEvent]) -> None:
            async with slots:
                await self._deliver_chain(chain, outcome, deadline)

        async with asyncio.TaskGroup() as group:
            for chain in _chains(events, utcnow()):
                group.create_task(one_device(chain))
        return outcome

    async def _deliver_chain(
        self, chain: list[OutboxEvent], outcome: _Outcome, deadline: float
    ) -> None:
        for event in chain:
            if time.monotonic() > deadline:
                return  # left undelivered and untouched: the next round takes it
            error = await self._send(event)
            if error is not None:
                outcome.failed[event.id] = self._failure(event, error)
                return  # the device's later events wait for this one
            outcome.delivered.append(event.id)

    async def _send(self, event: OutboxEvent) -> str | None:
        """Offer the event to each sink that has not taken it; None once all have."""
        envelope = Envelope.of(event)
        taken = self._accepted.setdefault(event.id, set())
        errors = []
        for index, sink in enumerate(self.sinks):
            if index in taken:
                continue
            try:
                await sink.send(envelope)
            except DeliveryError as exc:
                errors.append(f"{sink.name}: {exc}")
            except Exception as exc:
                # Only the type: an unexpected error's text might quote a secret.
                log.error("%s raised %s", sink.name, type(exc).__name__)
                errors.append(f"{sink.name}: {type(exc).__name__}")
            else:
                taken.add(index)
        return "; ".join(errors) or None

    def _failure(self, event: OutboxEvent, error: str) -> Failure:
        delay = self.backoff.delay(event.attempts)
        return Failure(event.attempts + 1, error, utcnow() + timedelta(seconds=delay))

    async def _record(self, tx: AsyncSession, outcome: _Outcome) -> None:
        if outcome.delivered:
            await outbox.mark_delivered(tx, outcome.delivered)
        for event_id, failure in outcome.failed.items():
            await outbox.mark_failed(tx, event_id, retry_at=failure.retry_at)

    def _remember(self, outcome: _Outcome) -> None:
        for event_id in outcome.delivered:
            self.failures.pop(event_id, None)
            self._accepted.pop(event_id, None)
        for event_id, failure in outcome.failed.items():
            self.failures[event_id] = failure
            log.warning(
                "event %s not delivered (attempt %d), retry at %s: %s",
                event_id,
                failure.attempts,
                failure.retry_at.isoformat(timespec="seconds"),
                failure.error,
            )
        self.delivered_count += len(outcome.delivered)
        _trim(self.failures)
        _trim(self._accepted)


def _chains(events: list[OutboxEvent], now: datetime) -> list[list[OutboxEvent]]:
    """Per-device runs in id order, each cut at its first event not yet due."""
    chains: dict[object, list[OutboxEvent]] = {}
    for event in sorted(events, key=lambda e: e.id):
        key = event.device_uuid if event.device_uuid is not None else ("no device", event.id)
        chains.setdefault(key, []).append(event)
    due = [list(takewhile(lambda e: e.next_attempt_at <= now, c)) for c in chains.values()]
    return [chain for chain in due if chain]


def _trim(tracked: dict) -> None:
    # Events delivered by another worker never leave these maps here; drop the oldest.
    while len(tracked) > MAX_TRACKED:
        del tracked[next(iter(tracked))]


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
