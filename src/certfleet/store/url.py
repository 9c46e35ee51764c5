"""Turn the database URLs operators write into async SQLAlchemy URLs.

Accepted forms:
- ``sqlite:///relative/file.db`` or ``sqlite:////absolute/file.db`` (default)
- ``postgresql://user:password@host:5432/dbname``

A PostgreSQL URL may carry libpq-style server settings, e.g.
``?options=-csearch_path%3Dcertfleet`` puts every table (and Alembic's
version table) in schema ``certfleet``; the same URL works with ``psql``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from certfleet.store.errors import StoreError

ACCEPTED = "use sqlite:///path/to/file.db or postgresql://user@host:5432/dbname"

_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
}


@dataclass(frozen=True)
class DatabaseUrl:
    """An async driver URL plus the keyword arguments its driver's connect() needs."""

    url: URL
    connect_args: dict[str, Any] = field(default_factory=dict)

    @property
    def is_sqlite(self) -> bool:
        """True for a SQLite file database."""
        return self.url.get_backend_name() == "sqlite"

    @property
    def sqlite_path(self) -> Path:
        """The SQLite database file (only meaningful when is_sqlite)."""
        return Path(self.url.database or "")

    def display(self) -> str:
        """The URL with any password masked, safe for logs and messages."""
        return self.url.render_as_string(hide_password=True)


def parse_url(raw: str) -> DatabaseUrl:
    """Validate an operator-supplied URL; raise StoreError naming the accepted forms."""
    try:
        url = make_url(raw)
    except ArgumentError:
        raise StoreError(f"cannot parse the database URL; {ACCEPTED}") from None
    driver = _DRIVERS.get(url.drivername)
    if driver is None:
        raise StoreError(f"unsupported database URL scheme '{url.drivername}'; {ACCEPTED}")
    url = url.set(drivername=driver)
    if url.get_backend_name() == "sqlite":
        return _sqlite(url)
    return _postgresql(url)


def _sqlite(url: URL) -> DatabaseUrl:
    if not url.database or url.database == ":memory:" or url.database.startswith("file:"):
        raise StoreError(f"SQLite needs a file path; {ACCEPTED}")
    return DatabaseUrl(url)


def _postgresql(url: URL) -> DatabaseUrl:
    if not url.database:
        raise StoreError(f"PostgreSQL URL has no database name; {ACCEPTED}")
    options = url.query.get("options")
    if options is None:
        return DatabaseUrl(url)
    if not isinstance(options, str):
        raise StoreError("give the PostgreSQL 'options' URL parameter only once")
    settings = server_settings(options)
    return DatabaseUrl(url.difference_update_query(["options"]), {"server_settings": settings})


def server_settings(options: str) -> dict[str, str]:
    """Parse libpq ``options`` ("-c name=value ..." or "--name=value") into a dict."""
    settings: dict[str, str] = {}
    words = iter(options.split())
    for word in words:
        if word == "-c":
            word = next(words, "")
        elif word.startswith("-c"):
            word = word[2:]
        elif word.startswith("--"):
            word = word[2:]
        else:
            word = ""
        name, sep, value = word.partition("=")
        if not sep or not name:
            raise StoreError(
                "PostgreSQL 'options' must look like -cname=value, e.g. "
                "?options=-csearch_path%3Dcertfleet"
            )
        settings[name.replace("-", "_")] = value
    return settings
