"""Row helpers shared by the query modules: lookups, duplicates, ON CONFLICT."""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.store.errors import DuplicateError, NotFoundError
from certfleet.store.schema import Base

_SQLITE_UNIQUE = {"SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"}
_PG_UNIQUE = "23505"

Row = TypeVar("Row", bound=Base)


def found(row: Row | None, missing: str) -> Row:
    """``row``, or NotFoundError(missing) if the lookup found nothing."""
    if row is None:
        raise NotFoundError(missing)
    return row


def is_unique_violation(err: IntegrityError) -> bool:
    """True if ``err`` is a unique/primary key clash (not a foreign key or CHECK failure)."""
    orig = err.orig
    return (
        getattr(orig, "sqlstate", None) == _PG_UNIQUE
        or getattr(orig, "sqlite_errorname", None) in _SQLITE_UNIQUE
    )


async def add_unique(session: AsyncSession, row: Row, duplicate: str) -> Row:
    """Insert ``row``; on a unique clash raise DuplicateError(duplicate).

    A savepoint keeps the caller's transaction usable after the error.
    """
    try:
        async with session.begin_nested():
            session.add(row)
    except IntegrityError as err:
        if is_unique_violation(err):
            raise DuplicateError(duplicate) from err
        raise
    return row


def upsert_insert(session: AsyncSession, table: Table) -> sqlite.Insert | postgresql.Insert:
    """An INSERT for ``table`` with this dialect's ON CONFLICT methods."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)
