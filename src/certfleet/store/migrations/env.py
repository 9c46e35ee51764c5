"""Alembic environment for the certfleet store.

certfleet.store.migrate passes a live connection in ``config.attributes``.
From the alembic command line the database comes from ``-x url=...`` or
CERTFLEET_DATABASE_URL and is reached through the same async engine code.
"""

import asyncio
import os

from alembic import context
from sqlalchemy import Connection

from certfleet.store.connect import make_engine
from certfleet.store.schema import metadata
from certfleet.store.url import parse_url

config = context.config


def run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER constraints; batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def command_line_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url")
    url = url or os.environ.get("CERTFLEET_DATABASE_URL")
    if not url:
        raise SystemExit("give the database: alembic -x url=sqlite:///path.db ...")
    return url


async def run_from_command_line() -> None:
    engine = make_engine(parse_url(command_line_url()))
    try:
        async with engine.begin() as connection:
            await connection.run_sync(run_on)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) mode is not supported; run against a database")
elif config.attributes.get("connection") is not None:
    run_on(config.attributes["connection"])
else:
    asyncio.run(run_from_command_line())
