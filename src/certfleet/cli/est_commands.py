"""`certfleet est ...`: enrollment credentials and requests held for approval."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.table import Table

from certfleet.est import admin
from certfleet.store.engine import Store, open_store
from certfleet.store.schema import PendingStatus

from .common import (
    CertfleetGroup,
    console,
    database_option,
    default_database,
    pki_option,
    print_json,
    run,
)

T = TypeVar("T")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+)([smhdw])")


def parse_duration(text: str) -> dt.timedelta:
    """'90s', '30m', '12h', '7d' or '2w' as a timedelta."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not match:
        raise click.BadParameter(f"{text!r} is not a duration like 30m, 12h, 7d or 2w")
    return dt.timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


async def _with_store(url: str, action: Callable[..., Awaitable[T]], *args: Any) -> T:
    store: Store = await open_store(url, upgrade=True)
    try:
        return await action(store, *args)
    finally:
        await store.close()


def _db(pki_dir: Path, database: str | None) -> str:
    return database or default_database(pki_dir)


@click.group(cls=CertfleetGroup)
def est() -> None:
    """EST server: bootstrap credentials and requests waiting for approval."""


@est.group(cls=CertfleetGroup)
def credentials() -> None:
    """One-time HTTP Basic credentials that let a new device enroll."""


@credentials.command("create")
@click.option("--device", required=True, metavar="UUID", help="The only CN it may enroll.")
@click.option(
    "--expires-in",
    default="7d",
    show_default=True,
    metavar="DURATION",
    callback=lambda _ctx, _param, value: parse_duration(value),
    help="How long it stays usable: 30m, 12h, 7d, 2w.",
)
@click.option("--factory", help="Factory name; needed only when the store holds several.")
@pki_option
@database_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON (includes the password).")
def credentials_create(
    device: str,
    expires_in: dt.timedelta,
    factory: str | None,
    pki_dir: Path,
    database: str | None,
    as_json: bool,
) -> None:
    """Create a credential for one device; the password is printed now and never again."""
    created = run(
        _with_store,
        _db(pki_dir, database),
        admin.create_credential,
        device,
        expires_in,
        factory,
    )
    if as_json:
        print_json(
            {
                "username": created.username,
                "password": created.password,
                "device": created.device_uuid,
                "factory": created.factory,
                "expires_at": created.expires_at.isoformat(),
            }
        )
        return
    click.echo(
        f"EST credential for device {created.device_uuid} (factory {created.factory}), "
        f"usable once until {created.expires_at:%Y-%m-%d %H:%M} UTC"
    )
    click.echo(f"username: {created.username}")
    click.echo(f"password: {created.password}")
    click.echo("The password is shown only now; certfleet keeps only its hash.")


@credentials.command("list")
@click.option("--factory", help="Only this factory's credentials.")
@pki_option
@database_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def credentials_list(
    factory: str | None, pki_dir: Path, database: str | None, as_json: bool
) -> None:
    """List credentials (never their passwords)."""
    infos = run(_with_store, _db(pki_dir, database), admin.list_credentials, factory)
    if as_json:
        print_json([info.as_dict() for info in infos])
        return
    table = Table(title="EST enrollment credentials")
    for column in ("username", "device", "factory", "state", "expires", "used"):
        table.add_column(column, no_wrap=True)
    for info in infos:
        table.add_row(
            info.username,
            info.device_uuid,
            info.factory,
            info.state,
            f"{info.expires_at:%Y-%m-%d %H:%M}",
            f"{info.used_at:%Y-%m-%d %H:%M}" if info.used_at else "",
        )
    console.print(table)


@est.group(cls=CertfleetGroup)
def pending() -> None:
    """Requests held for manual approval."""


@pending.command("list")
@click.option(
    "--status",
    type=click.Choice([s.value for s in PendingStatus]),
    help="Only requests with this status.",
)
@pki_option
@database_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def pending_list(status: str | None, pki_dir: Path, database: str | None, as_json: bool) -> None:
    """List held requests, oldest first."""
    wanted = PendingStatus(status) if status else None
    infos = run(_with_store, _db(pki_dir, database), admin.list_pending, wanted)
    if as_json:
        print_json([info.as_dict() for info in infos])
        return
    table = Table(title="EST requests held for approval")
    for column in ("id", "status", "device", "subject", "received", "issued"):
        table.add_column(column, no_wrap=column != "subject")
    for info in infos:
        table.add_row(
            str(info.id),
            info.status,
            info.device_uuid or "",
            info.subject,
            f"{info.created_at:%Y-%m-%d %H:%M}",
            "yes" if info.cert_id else "",
        )
    console.print(table)


@pending.command("approve")
@click.argument("pending_id", metavar="ID", type=int)
@pki_option
@database_option
def pending_approve(pending_id: int, pki_dir: Path, database: str | None) -> None:
    """Approve request ID: the client's identical retry gets its certificate."""
    info = run(_with_store, _db(pki_dir, database), admin.decide_pending, pending_id, True)
    click.echo(f"request {info.id} ({info.subject}) approved; the client's next retry gets it")


@pending.command("reject")
@click.argument("pending_id", metavar="ID", type=int)
@pki_option
@database_option
def pending_reject(pending_id: int, pki_dir: Path, database: str | None) -> None:
    """Reject request ID: the client's retries get 403."""
    info = run(_with_store, _db(pki_dir, database), admin.decide_pending, pending_id, False)
    click.echo(f"request {info.id} ({info.subject}) rejected")
