"""The store's hot path: the few queries every device request makes, without the ORM.

Each EST renewal and each gateway check-in is one call here: on SQLite one
synchronous function in one thread hop (hot_sqlite.py), on PostgreSQL
prepared asyncpg statements (hot_postgres.py). The async ORM on the same
work cost 7-9 ms per renewal, most of a request (docs/benchmarks.md);
operator actions and rarer device requests keep using it.

Decisions stay with the caller: an issuing call reads one row, hands it
to the caller's `decide` (which may raise a refusal, and then nothing is
written) and writes what `decide` returned. `decide` may run in another
thread, so it must not touch the event loop.

Open one with `Store.hot_path()`: it connects on first use, so a worker
forked after the store was opened gets connections of its own.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

from certfleet.store.hot_rows import (
    CheckinRow,
    ClientLookup,
    ClientRow,
    ConfigFileRow,
    DenylistPoll,
    Issue,
    Seen,
)

DecideIssue = Callable[[ClientRow | None], Issue]


class HotPath(abc.ABC):
    """The per-request queries of EST and the gateway, one round trip or thread hop each."""

    @abc.abstractmethod
    async def issue(self, lookup: ClientLookup, decide: DecideIssue) -> int:
        """Read the client's row, let `decide` check it and sign, record what it returns.

        One write transaction: the certificate, its outbox event and audit row
        are committed before this returns the certificate's row id. If
        `decide` raises, nothing is written.
        """

    @abc.abstractmethod
    async def client(self, lookup: ClientLookup) -> ClientRow | None:
        """The client's row as `issue` reads it, in a read of its own (None if unknown)."""

    @abc.abstractmethod
    async def checkin(self, sha256: str) -> CheckinRow | None:
        """A client certificate's check-in row, None if unknown; a read that takes no lock."""

    @abc.abstractmethod
    async def mark_seen(self, seen: list[Seen]) -> None:
        """Set last_seen_at of these devices, in one transaction."""

    @abc.abstractmethod
    async def config_files(
        self, factory_id: int, group_name: str | None, device_uuid: str
    ) -> list[ConfigFileRow]:
        """The factory, group and device files that apply to a device, by name then scope."""

    @abc.abstractmethod
    async def denied_page(self, after_id: int, page_size: int) -> list[tuple[int, str]]:
        """(id, fingerprint) of deny-list entries with id > `after_id`, in id order."""

    @abc.abstractmethod
    async def denied_poll(self, after_id: int, gaps: list[int], page_size: int) -> DenylistPoll:
        """New entries, the entries among `gaps` (ids that may commit late), the change counter."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the connections; the next call opens new ones."""
