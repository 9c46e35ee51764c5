"""`certfleet db ...`: the store's schema."""

from __future__ import annotations

from pathlib import Path

import click

from certfleet.store.engine import open_store

from .common import CertfleetGroup, console, database_option, default_database, pki_option, run


@click.group(cls=CertfleetGroup)
def db() -> None:
    """The database behind certfleet."""


@db.command("upgrade")
@pki_option
@database_option
def upgrade(pki_dir: Path, database: str | None) -> None:
    """Create or migrate the schema to the newest version."""

    async def _upgrade() -> str | None:
        store = await open_store(database or default_database(pki_dir), upgrade=True)
        try:
            return await store.current_revision()
        finally:
            await store.close()

    console.print(f"schema at revision {run(_upgrade)}")
