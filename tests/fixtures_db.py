"""Database fixtures: store tests run on a SQLite file and on PostgreSQL.

PostgreSQL runs when CERTFLEET_TEST_DATABASE_URL is set (it is skipped otherwise,
and fails if set but unreachable). Each PostgreSQL test gets a fresh schema
``t_<random>``, dropped afterwards. The schema travels inside the URL as
``?options=-csearch_path%3Dt_<random>``, so anything handed ``db_url`` (the
store, Alembic's version table, a server subprocess) stays inside it.
"""

import asyncio
import os
import secrets
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from certfleet.store import Store, open_store
from certfleet.store.connect import make_engine
from certfleet.store.url import parse_url

PG_ENV = "CERTFLEET_TEST_DATABASE_URL"
PG_CONNECT_TIMEOUT = 15


def with_search_path(url: str, schema: str) -> str:
    """``url`` with libpq options that make ``schema`` the only search path."""
    parsed = make_url(url)
    options = " ".join(filter(None, [parsed.query.get("options"), f"-csearch_path={schema}"]))
    return parsed.update_query_dict({"options": options}).render_as_string(hide_password=False)


async def _pg_schema(base_url: str, sql: str) -> None:
    engine = make_engine(parse_url(base_url))
    try:
        async with asyncio.timeout(PG_CONNECT_TIMEOUT), engine.begin() as conn:
            await conn.execute(text(sql))
    finally:
        await engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
async def db_url(request, tmp_path) -> AsyncIterator[str]:
    """A URL to an empty database of each kind, private to the test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'certfleet.db'}"
        return
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"set {PG_ENV} to run PostgreSQL tests")
    schema = f"t_{secrets.token_hex(6)}"
    try:
        await _pg_schema(base, f"CREATE SCHEMA {schema}")
    except Exception as err:  # CI sets the variable: an unreachable server must fail
        pytest.fail(f"{PG_ENV} is set but PostgreSQL is unreachable: {err!r}")
    try:
        yield with_search_path(base, schema)
    finally:
        await _pg_schema(base, f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
async def store(db_url) -> AsyncIterator[Store]:
    """An open store on ``db_url``, migrated to the newest schema."""
    opened = await open_store(db_url, upgrade=True)
    try:
        yield opened
    finally:
        await opened.close()
