"""Run the Alembic migrations programmatically (no alembic command needed)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine

from certfleet.store.connect import make_engine
from certfleet.store.url import parse_url

ALEMBIC_INI = Path(__file__).with_name("alembic.ini")
# Arbitrary constant shared by all certfleet processes migrating one database.
_PG_LOCK_KEY = 0x63657274666C74


def alembic_config() -> Config:
    """The packaged Alembic configuration."""
    return Config(str(ALEMBIC_INI))


def head_revision() -> str | None:
    """The newest migration shipped with this version of certfleet."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def upgrade_engine(engine: AsyncEngine, revision: str = "head") -> None:
    """Migrate the database behind ``engine`` up to ``revision`` in one transaction."""
    async with engine.begin() as conn:
        await conn.run_sync(_migrate, command.upgrade, revision)


async def downgrade_engine(engine: AsyncEngine, revision: str) -> None:
    """Migrate the database behind ``engine`` down to ``revision`` ("base": empty)."""
    async with engine.begin() as conn:
        await conn.run_sync(_migrate, command.downgrade, revision)


async def engine_revision(engine: AsyncEngine) -> str | None:
    """The revision the database behind ``engine`` is at; None if never migrated."""
    async with engine.connect() as conn:
        return await conn.run_sync(_revision)


async def upgrade(url: str) -> None:
    """Migrate the database at ``url`` to the newest revision."""
    engine = make_engine(parse_url(url))
    try:
        await upgrade_engine(engine)
    finally:
        await engine.dispose()


async def current_revision(url: str) -> str | None:
    """The revision the database at ``url`` is at; None if never migrated."""
    engine = make_engine(parse_url(url))
    try:
        return await engine_revision(engine)
    finally:
        await engine.dispose()


def _migrate(conn: Connection, step: Callable[[Config, str], None], revision: str) -> None:
    if conn.dialect.name == "postgresql":
        # Several server processes may start at once: one migrates, the rest wait.
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
    config = alembic_config()
    config.attributes["connection"] = conn
    step(config, revision)


def _revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()
