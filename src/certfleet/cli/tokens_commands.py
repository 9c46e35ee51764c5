"""`certfleet tokens ...`: operator API tokens (device registration and, later, the admin API)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click
from rich.table import Table

from certfleet.fleet import tokens_admin
from certfleet.fleet.tokens_admin import SCOPES, TokenInfo

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


def _when(moment: dt.datetime | None) -> str:
    return f"{moment:%Y-%m-%d %H:%M}" if moment else ""


@click.group(cls=CertfleetGroup)
def tokens() -> None:
    """Scoped, expiring API tokens; the store keeps only their SHA-256."""


@tokens.command("create")
@click.option("--name", required=True, help="Who or what uses it, e.g. factory-line-3.")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    required=True,
    metavar="SCOPE",
    help=f"What it may do; repeat for several. One of: {', '.join(SCOPES)}.",
)
@click.option(
    "--expires-in",
    default="30d",
    show_default=True,
    metavar="DURATION",
    callback=lambda _ctx, _param, value: parse_duration(value),
    help="How long it stays usable: 30m, 12h, 7d, 2w.",
)
@pki_option
@database_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON (includes the token).")
def create(
    name: str,
    scopes: tuple[str, ...],
    expires_in: dt.timedelta,
    pki_dir: Path,
    database: str | None,
    as_json: bool,
) -> None:
    """Create a token; it is printed now and never again."""
    created = run(
        _with_store,
        _db(pki_dir, database),
        tokens_admin.create_token,
        name,
        list(scopes),
        expires_in,
    )
    info = created.info
    if as_json:
        print_json({**info.as_dict(), "token": created.token})
        return
    click.echo(
        f"API token {info.id} '{info.name}' (scopes: {', '.join(info.scopes)}), "
        f"usable until {_when(info.expires_at)} UTC"
    )
    click.echo(f"token: {created.token}")
    click.echo("The token is shown only now; certfleet keeps only its hash.")


@tokens.command("list")
@pki_option
@database_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_(pki_dir: Path, database: str | None, as_json: bool) -> None:
    """List tokens (never the token or its hash)."""
    infos: list[TokenInfo] = run(_with_store, _db(pki_dir, database), tokens_admin.list_tokens)
    if as_json:
        print_json([info.as_dict() for info in infos])
        return
    table = Table(title="API tokens")
    for column in ("id", "name", "scopes", "state", "expires", "last used"):
        table.add_column(column, no_wrap=column != "name")
    for info in infos:
        table.add_row(
            str(info.id),
            info.name,
            ",".join(info.scopes),
            info.state,
            _when(info.expires_at),
            _when(info.last_used_at),
        )
    console.print(table)


@tokens.command("revoke")
@click.argument("token_id", metavar="ID", type=int)
@pki_option
@database_option
def revoke(token_id: int, pki_dir: Path, database: str | None) -> None:
    """Revoke token ID at once: every later request with it gets 401."""
    info, already = run(_with_store, _db(pki_dir, database), tokens_admin.revoke_token, token_id)
    if already:
        when = _when(info.revoked_at)
        click.echo(f"API token {info.id} '{info.name}' was already revoked at {when} UTC")
        return
    click.echo(f"API token {info.id} '{info.name}' revoked; it can no longer be used")
