"""The hot path on PostgreSQL: asyncpg with prepared statements, one pool per process.

asyncpg prepares each statement once per connection and reuses it, so a
request costs its round trips and little else: a check-in is one, an issuing
request two (the client's row, then one statement that writes certificate,
event and audit row, atomic by itself). No BEGIN/COMMIT around the two: under
READ COMMITTED, PostgreSQL's default and what the ORM path ran, each statement
of a transaction sees the latest commits anyway, so a transaction would only
add two round trips. The pool connects on first use, in the process that uses it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from typing import Any

import asyncpg

from certfleet.store import hot_sql as sql
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

POOL_SIZE = 10
# Keyword arguments SQLAlchemy's asyncpg dialect takes for itself, not for asyncpg.connect.
_SQLALCHEMY_ONLY = {"prepared_statement_cache_size", "prepared_statement_name_func"}


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset: the hot path sets no session state (no SET, LISTEN or locks).

    asyncpg's default reset is a round trip per release; an open transaction is
    still rolled back before this is called.
    """


def _same(value: Any) -> Any:
    return value


def _args(statement: str, values: dict[str, Any]) -> tuple[str, list[Any]]:
    text, names = sql.numbered(statement)
    return text, [values[name] for name in names]


class PostgresHotPath(HotPath):
    """The hot path on one PostgreSQL database, for the process that created it."""

    def __init__(self, connect_kwargs: dict[str, Any]) -> None:
        self._connect_kwargs = {
            k: v for k, v in connect_kwargs.items() if k not in _SQLALCHEMY_ONLY
        }
        self._pool: asyncio.Future[asyncpg.Pool] | None = None

    async def _get_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            # Shared by concurrent first calls, so only one pool is made.
            self._pool = asyncio.ensure_future(
                asyncpg.create_pool(
                    min_size=1, max_size=POOL_SIZE, reset=_keep_session, **self._connect_kwargs
                )
            )
        try:
            return await asyncio.shield(self._pool)
        except Exception:
            if self._pool is not None and self._pool.done():
                self._pool = None  # connecting failed: try again on the next call
            raise

    # -- EST issuing ------------------------------------------------------------------------

    async def issue(self, lookup: ClientLookup, decide: DecideIssue) -> int:
        client, client_args = _args(sql.CLIENT, _lookup_values(lookup))
        pool = await self._get_pool()
        async with pool.acquire() as conn:
            found = await conn.fetchrow(client, *client_args)
            issue = decide(build(ClientRow, found, _same) if found is not None else None)
            statement, args = _args(sql.ISSUE_IN_ONE, _issue_values(issue))
            try:
                return await conn.fetchval(statement, *args)
            except asyncpg.UniqueViolationError as exc:
                cert = issue.certificate
                raise DuplicateError(
                    f"certificate {cert.sha256} (or serial {cert.serial} from the same CA) "
                    "is already stored"
                ) from exc

    async def client(self, lookup: ClientLookup) -> ClientRow | None:
        pool = await self._get_pool()
        statement, args = _args(sql.CLIENT, _lookup_values(lookup))
        found = await pool.fetchrow(statement, *args)
        return build(ClientRow, found, _same) if found is not None else None

    # -- gateway check-in -------------------------------------------------------------------

    async def checkin(self, sha256: str) -> CheckinRow | None:
        pool = await self._get_pool()
        statement, args = _args(sql.CHECKIN, {"sha256": sha256})
        found = await pool.fetchrow(statement, *args)
        return build(CheckinRow, found, _same) if found is not None else None

    async def mark_seen(self, seen: list[Seen]) -> None:
        if not seen:
            return
        pool = await self._get_pool()
        rows = [_args(sql.MARK_SEEN, {"at": s.at, "device_uuid": s.device_uuid}) for s in seen]
        # executemany runs in one transaction.
        await pool.executemany(rows[0][0], [args for _, args in rows])

    async def config_files(
        self, factory_id: int, group_name: str | None, device_uuid: str
    ) -> list[ConfigFileRow]:
        pool = await self._get_pool()
        statement, args = _args(
            sql.CONFIG_FILES,
            {"factory_id": factory_id, "group_name": group_name, "device_uuid": device_uuid},
        )
        return [
            ConfigFileRow(r[0], r[1], r[2], json.loads(r[3]), bool(r[4]))
            for r in await pool.fetch(statement, *args)
        ]

    # -- deny-list and change counter -------------------------------------------------------

    async def denied_page(self, after_id: int, page_size: int) -> list[tuple[int, str]]:
        pool = await self._get_pool()
        statement, args = _args(sql.DENIED_AFTER, {"after_id": after_id, "page_size": page_size})
        return [(r[0], r[1]) for r in await pool.fetch(statement, *args)]

    async def denied_poll(self, after_id: int, gaps: list[int], page_size: int) -> DenylistPoll:
        pool = await self._get_pool()
        statement, args = _args(sql.DENIED_AFTER, {"after_id": after_id, "page_size": page_size})
        # REPEATABLE READ: the entries and the counter from one snapshot.
        async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            rows = [(r[0], r[1]) for r in await conn.fetch(statement, *args)]
            if gaps:
                among = await conn.fetch(sql.DENIED_AMONG_POSTGRESQL, gaps)
                rows += [(r[0], r[1]) for r in among]
            generation = await conn.fetchval(sql.GENERATION)
        return DenylistPoll(rows, generation)

    async def close(self) -> None:
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        if not pool.done():
            pool.cancel()
        elif not pool.cancelled() and pool.exception() is None:
            await pool.result().close()


def _lookup_values(lookup: ClientLookup) -> dict[str, Any]:
    return {
        "sha256": lookup.sha256,
        "factory_id": lookup.factory_id,
        "issuing_ca_id": lookup.issuing_ca_id,
    }


def _issue_values(issue: Issue) -> dict[str, Any]:
    cert = issue.certificate
    return {
        "serial": cert.serial,
        "sha256": cert.sha256,
        "subject": cert.subject,
        "pubkey_sha256": cert.pubkey_sha256,
        "issuer_ca_id": cert.issuer_ca_id,
        "device_uuid": cert.device_uuid,
        "not_before": cert.not_before,
        "not_after": cert.not_after,
        "cert_pem": cert.cert_pem,
        "issued_by_request": cert.issued_by_request,
        "now": dt.datetime.now(dt.UTC),
        "topic": issue.topic,
        "payload": json.dumps(issue.payload),
        "actor": issue.actor,
        "action": issue.action,
        "details": json.dumps(issue.details),
    }
