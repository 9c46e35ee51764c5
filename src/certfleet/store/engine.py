"""The Store: an engine, a session factory and transactions."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import TracebackType

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from certfleet.store.connect import make_engine
from certfleet.store.hot_path import HotPath
from certfleet.store.hot_sqlite import SqliteHotPath
from certfleet.store.migrate import engine_revision, upgrade_engine
from certfleet.store.url import DatabaseUrl, parse_url

log = logging.getLogger(__name__)


class Store:
    """An open database; query functions run on the sessions it hands out."""

    def __init__(self, engine: AsyncEngine, display_url: str, db: DatabaseUrl) -> None:
        self.engine = engine
        self.display_url = display_url
        self.db = db
        # Rows stay readable after commit; the query functions return them to callers.
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._hot: HotPath | None = None
        self._hot_pid = 0

    def hot_path(self) -> HotPath:
        """The per-request queries without the ORM (see hot_path.py), for this process."""
        if self._hot is None or self._hot_pid != os.getpid():
            self._hot = _open_hot_path(self.db, self.engine)
            self._hot_pid = os.getpid()
        return self._hot

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session in a transaction: committed on success, rolled back on exception."""
        async with self.sessions.begin() as session:
            yield session

    async def upgrade(self) -> None:
        """Migrate this database to the newest schema."""
        await upgrade_engine(self.engine)

    async def current_revision(self) -> str | None:
        """The schema revision of this database; None if never migrated."""
        return await engine_revision(self.engine)

    async def close(self) -> None:
        """Close all pooled connections."""
        if self._hot is not None and self._hot_pid == os.getpid():
            await self._hot.close()
        self._hot = None
        await self.engine.dispose()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def open_store(url: str, *, upgrade: bool = False) -> Store:
    """Open the database at ``url`` (see certfleet.store.url for accepted forms).

    For PostgreSQL, ``?options=-csearch_path%3D<schema>`` keeps every table,
    including Alembic's version table, in ``<schema>``. With ``upgrade``,
    migrate to the newest schema first.
    """
    db = parse_url(url)
    store = Store(make_engine(db), db.display(), db)
    if upgrade:
        try:
            await store.upgrade()
        except BaseException:
            await store.close()
            raise
    log.info("store opened: %s", store.display_url)
    return store


@asynccontextmanager
async def opened(store: Store | str) -> AsyncIterator[Store]:
    """An open store as given (the admin API's), or one opened and migrated on a URL for
    a command and closed afterwards: operator actions take either."""
    if isinstance(store, Store):
        yield store
        return
    own = await open_store(store, upgrade=True)
    try:
        yield own
    finally:
        await own.close()


def _open_hot_path(db: DatabaseUrl, engine: AsyncEngine) -> HotPath:
    if db.is_sqlite:
        hot = SqliteHotPath(db.sqlite_path)
        # Whoever empties the ORM's pool wants fresh SQLite connections (file locks,
        # see connect.py); the hot path's connection follows.
        event.listen(engine.sync_engine, "engine_disposed", lambda _engine: hot.reopen())
        return hot
    # Here, not at the top: only PostgreSQL stores need asyncpg loaded.
    from certfleet.store.hot_postgres import PostgresHotPath

    _, params = engine.dialect.create_connect_args(engine.url)
    return PostgresHotPath({**params, **db.connect_args})
