"""`certfleet est ...`: enrollment credentials and requests held for approval."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click
from rich.table import Table

from certfleet.est import admin
from certfleet.store.schema import PendingStatus

from .common import (
    CertfleetGroup,
    console,
    database_option,
    parse_duration,
    pki_option,
    print_json,
    run,
)
from .common import (
    store_url as _db,
)
from .common import (
    with_store as _with_store,
)


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
