"""The Store: an engine, a session factory and transactions."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import TracebackType

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from certfleet.store.connect import make_engine
from certfleet.store.migrate import engine_revision, upgrade_engine
from certfleet.store.url import parse_url

log = logging.getLogger(__name__)


class Store:
    """An open database; query functions run on the sessions it hands out."""

    def __init__(self, engine: AsyncEngine, display_url: str) -> None:
        self.engine = engine
        self.display_url = display_url
        # Rows stay readable after commit; the query functions return them to callers.
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)

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
    store = Store(make_engine(db), db.display())
    if upgrade:
        try:
            await store.upgrade()
        except BaseException:
            await store.close()
            raise
    log.info("store opened: %s", store.display_url)
    return store
