"""`certfleet events ...`: what the outbox holds and whether it went out."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.events.names import Envelope, rfc3339
from certfleet.store import outbox
from certfleet.store.engine import Store, open_store
from certfleet.store.errors import StoreError
from certfleet.store.schema import OutboxEvent
from certfleet.store.url import parse_url

from .common import (
    CertfleetGroup,
    console,
    database_option,
    default_database,
    pki_option,
    run,
)

FOLLOW_INTERVAL = 1.0
# Ids are taken at insert, not commit: a transaction may commit a lower id than
# one already printed. --follow looks this many ids back and skips what it showed.
FOLLOW_SLACK = 200
Show = Callable[[OutboxEvent], None]


@click.group(cls=CertfleetGroup)
def events() -> None:
    """Events sent to webhooks and NATS."""


@events.command("tail")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events until Ctrl-C.")
@click.option("--topic", help="Only this topic, e.g. DEVICE_PUBKEY_CHANGE.")
@click.option("--device", metavar="UUID", help="Only events of this device.")
@click.option(
    "-n",
    "--limit",
    type=click.IntRange(1, 100_000),
    default=20,
    show_default=True,
    help="How many of the newest events to print first.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@pki_option
@database_option
def tail(
    follow: bool,
    topic: str | None,
    device: str | None,
    limit: int,
    as_json: bool,
    pki_dir: Path,
    database: str | None,
) -> None:
    """Print the newest events, oldest first, with their delivery state."""
    url = database or default_database(pki_dir)
    show = _print_json if as_json else _print_line
    try:
        run(_tail, url, show, limit=limit, topic=topic, device=device, follow=follow)
    except KeyboardInterrupt:
        pass


async def _tail(
    url: str, show: Show, *, limit: int, topic: str | None, device: str | None, follow: bool
) -> None:
    where = {"topic": topic, "device_uuid": device}
    store = await _open(url)
    try:
        async with store.transaction() as tx:
            rows = await outbox.latest_events(tx, limit=limit, **where)
            shown = _show_new(rows, show, await _left_out(tx, rows, where))
        while follow:
            await asyncio.sleep(FOLLOW_INTERVAL)
            since = max(shown, default=0) - FOLLOW_SLACK
            async with store.transaction() as tx:
                rows = await outbox.events_after(tx, since, **where)
            shown = {i for i in _show_new(rows, show, shown) if i > since}
    finally:
        await store.close()


async def _left_out(tx: AsyncSession, rows: list[OutboxEvent], where: dict) -> set[int]:
    """Ids just below the newest shown that --limit left out; follow must not print them."""
    if not rows:
        return set()
    top = rows[-1].id
    near = await outbox.events_after(tx, top - FOLLOW_SLACK, **where)
    return {row.id for row in near if row.id < rows[0].id}


async def _open(url: str) -> Store:
    db = parse_url(url)
    # Opening a SQLite URL creates the file; a reader should not leave one behind.
    if db.is_sqlite and not db.sqlite_path.exists():
        raise StoreError(f"no store at {db.sqlite_path}; check --pki or --database")
    store = await open_store(url)
    if await store.current_revision() is None:
        await store.close()
        raise StoreError(
            f"{store.display_url} holds no certfleet schema; run `certfleet db upgrade`"
        )
    return store


def _show_new(rows: list[OutboxEvent], show: Show, shown: set[int]) -> set[int]:
    """Print the rows not shown before; return every id shown so far."""
    for row in rows:
        if row.id not in shown:
            show(row)
            shown.add(row.id)
    return shown


def tail_record(row: OutboxEvent) -> dict[str, Any]:
    """An outbox row as printed by --json: the envelope plus its delivery state."""
    return {
        **Envelope.of(row).to_dict(),
        "delivered_at": rfc3339(row.delivered_at) if row.delivered_at else None,
        "attempts": row.attempts,
        "next_attempt_at": None if row.delivered_at else rfc3339(row.next_attempt_at),
    }


def _print_json(row: OutboxEvent) -> None:
    click.echo(json.dumps(tail_record(row), sort_keys=True))


def _print_line(row: OutboxEvent) -> None:
    if row.delivered_at:
        state = "[green]delivered[/green]"
    else:
        tries = f", {row.attempts} failed" if row.attempts else ""
        state = f"[yellow]pending{tries}[/yellow]"
    data = escape(json.dumps(row.payload, sort_keys=True))
    console.print(
        f"{rfc3339(row.created_at)} [dim]#{row.id}[/dim] [bold]{escape(row.topic)}[/bold] "
        f"{escape(row.device_uuid or '-')} {state} {data}",
        highlight=False,
        soft_wrap=True,
    )
