"""The hot path on SQLite: each request's SQL as one function, in one thread, on sqlite3.

One connection per process, used only by one worker thread, so every call is
one hop off the event loop and back; requests queue for that thread, which
holds the database for about 0.1-0.5 ms per call. Reads run in autocommit
(a WAL read snapshot per statement), so the deny-list poll and 304 check-ins
never take the write lock; an issuing request takes it up front with BEGIN
IMMEDIATE, so a second worker waits (busy timeout) instead of failing with
"database is locked".

Timestamps are stored as SQLAlchemy's SQLite dialect stores them (UTC,
"YYYY-MM-DD HH:MM:SS.ffffff"), so ORM and hot path read each other's rows and
text order is time order.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from certfleet.store import hot_sql as sql
from certfleet.store.connect import SQLITE_PRAGMAS
from certfleet.store.errors import DuplicateError
from certfleet.store.hot_path import DecideIssue, HotPath
from certfleet.store.hot_rows import (
    CheckinRow,
    ClientLookup,
    ClientRow,
    ConfigFileRow,
    DenylistPoll,
    Issue,
    Seen,
    build,
)

T = TypeVar("T")
_TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
_UNIQUE = {"SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"}


def stored_time(moment: dt.datetime) -> str:
    """A timestamp as the store keeps it on SQLite."""
    return moment.astimezone(dt.UTC).strftime(_TIME_FORMAT)


def read_time(text: str | None) -> dt.datetime | None:
    """A stored SQLite timestamp back as an aware UTC datetime."""
    return None if text is None else dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)


class SqliteHotPath(HotPath):
    """The hot path on one SQLite file, for the process that created it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="certfleet-hot-store")
        self._connection: sqlite3.Connection | None = None  # used in self._thread only
        self._reopen = False

    def reopen(self) -> None:
        """Use a new connection from the next call on (the store's pool was emptied)."""
        self._reopen = True

    async def _run(self, work: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, work, *args)

    def _conn(self) -> sqlite3.Connection:
        if self._reopen:
            self._reopen = False
            self._disconnect()
        if self._connection is None:
            self._connection = _connect(self.path)
        return self._connection

    def _disconnect(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    # -- EST issuing ------------------------------------------------------------------------

    async def issue(self, lookup: ClientLookup, decide: DecideIssue) -> int:
        return await self._run(self._issue, lookup, decide)

    def _issue(self, lookup: ClientLookup, decide: DecideIssue) -> int:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            found = conn.execute(sql.CLIENT, _lookup_params(lookup)).fetchall()
            issue = decide(build(ClientRow, found[0], read_time) if found else None)
            cert_id = _record(conn, issue)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return cert_id

    async def client(self, lookup: ClientLookup) -> ClientRow | None:
        found = await self._run(self._fetch, sql.CLIENT, _lookup_params(lookup))
        return build(ClientRow, found[0], read_time) if found else None

    # -- gateway check-in -------------------------------------------------------------------

    async def checkin(self, sha256: str) -> CheckinRow | None:
        found = await self._run(self._fetch, sql.CHECKIN, {"sha256": sha256})
        return build(CheckinRow, found[0], read_time) if found else None

    async def mark_seen(self, seen: list[Seen]) -> None:
        if not seen:
            return
        params = [{"at": stored_time(s.at), "device_uuid": s.device_uuid} for s in seen]
        await self._run(self._write_many, sql.MARK_SEEN, params)

    def _write_many(self, statement: str, params: list[dict[str, Any]]) -> None:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(statement, params)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    async def config_files(
        self, factory_id: int, group_name: str | None, device_uuid: str
    ) -> list[ConfigFileRow]:
        params = {"factory_id": factory_id, "group_name": group_name, "device_uuid": device_uuid}
        rows = await self._run(self._fetch, sql.CONFIG_FILES, params)
        return [
            ConfigFileRow(name, scope, value, json.loads(on_changed), bool(unencrypted))
            for name, scope, value, on_changed, unencrypted in rows
        ]

    # -- deny-list and change counter -------------------------------------------------------

    async def denied_page(self, after_id: int, page_size: int) -> list[tuple[int, str]]:
        params = {"after_id": after_id, "page_size": page_size}
        return await self._run(self._fetch, sql.DENIED_AFTER, params)

    async def denied_poll(self, after_id: int, gaps: list[int], page_size: int) -> DenylistPoll:
        return await self._run(self._denied_poll, after_id, gaps, page_size)

    def _denied_poll(self, after_id: int, gaps: list[int], page_size: int) -> DenylistPoll:
        conn = self._conn()
        # One read transaction: the entries and the counter from the same snapshot.
        conn.execute("BEGIN")
        try:
            params = {"after_id": after_id, "page_size": page_size}
            rows = conn.execute(sql.DENIED_AFTER, params).fetchall()
            if gaps:
                ids = json.dumps(gaps)
                rows += conn.execute(sql.DENIED_AMONG_SQLITE, {"ids": ids}).fetchall()
            generation = conn.execute(sql.GENERATION).fetchall()[0][0]
        finally:
            conn.execute("COMMIT")
        return DenylistPoll(rows, generation)

    def _fetch(self, statement: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        return self._conn().execute(statement, params).fetchall()

    async def close(self) -> None:
        await self._run(self._disconnect)
        self._thread.shutdown(wait=True)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="certfleet-hot-store")


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: no implicit BEGIN; each call says what transaction it needs.
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in SQLITE_PRAGMAS:
        conn.execute(pragma)
    return conn


def _lookup_params(lookup: ClientLookup) -> dict[str, Any]:
    return {
        "sha256": lookup.sha256,
        "factory_id": lookup.factory_id,
        "issuing_ca_id": lookup.issuing_ca_id,
    }


def _record(conn: sqlite3.Connection, issue: Issue) -> int:
    """Insert the certificate, its event and its audit row; the certificate's id."""
    cert = issue.certificate
    now = stored_time(dt.datetime.now(dt.UTC))
    values = {
        "serial": cert.serial,
        "sha256": cert.sha256,
        "subject": cert.subject,
        "pubkey_sha256": cert.pubkey_sha256,
        "issuer_ca_id": cert.issuer_ca_id,
        "device_uuid": cert.device_uuid,
        "not_before": stored_time(cert.not_before),
        "not_after": stored_time(cert.not_after),
        "cert_pem": cert.cert_pem,
        "issued_by_request": cert.issued_by_request,
        "now": now,
        "topic": issue.topic,
        "payload": json.dumps(issue.payload),
        "actor": issue.actor,
        "action": issue.action,
        "details": json.dumps(issue.details),
    }
    try:
        cert_id = conn.execute(sql.INSERT_CERTIFICATE, values).lastrowid
    except sqlite3.IntegrityError as exc:
        if getattr(exc, "sqlite_errorname", None) in _UNIQUE:
            raise DuplicateError(
                f"certificate {cert.sha256} (or serial {cert.serial} from the same CA) "
                "is already stored"
            ) from exc
        raise
    conn.execute(sql.INSERT_EVENT, values)
    conn.execute(sql.INSERT_AUDIT, values)
    assert cert_id is not None
    return cert_id
