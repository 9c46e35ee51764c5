"""Create async engines: SQLite files get WAL, foreign keys, a busy timeout and mode 0600."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from certfleet.store.url import DatabaseUrl

BUSY_TIMEOUT_MS = 5000
SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA foreign_keys=ON",
    f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}",
)


def make_engine(db: DatabaseUrl) -> AsyncEngine:
    """An AsyncEngine for ``db``; parameters are kept out of logs and error text."""
    if db.is_sqlite:
        prepare_sqlite_file(db.sqlite_path)
    engine = create_async_engine(db.url, connect_args=db.connect_args, hide_parameters=True)
    if db.is_sqlite:
        event.listen(engine.sync_engine, "connect", _sqlite_connect)
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
    return engine


def prepare_sqlite_file(path: Path) -> None:
    """Create the database file (and its directory) readable by the owner only."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        # Never open and close an existing database file: closing any descriptor
        # drops every POSIX lock this process holds on it, including SQLite's.
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
        except FileExistsError:
            pass
    # SQLite gives the -wal and -shm files the database file's mode.
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)


def _sqlite_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # Leave BEGIN to _sqlite_begin: the sqlite3 module's own (legacy) transaction
    # handling skips BEGIN for SELECT and SAVEPOINT.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    for pragma in SQLITE_PRAGMAS:
        cursor.execute(pragma)
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    # IMMEDIATE takes the write lock up front, so a second process waits for
    # busy_timeout instead of failing with "database is locked" when a
    # transaction that has read turns into a writer.
    conn.exec_driver_sql("BEGIN IMMEDIATE")
