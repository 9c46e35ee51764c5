"""`certfleet config ...`: device config files at factory, group or device scope."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from certfleet.fleet import config_admin
from certfleet.store.config_files import ConfigValue
from certfleet.store.schema import ConfigScope

from .common import (
    CertfleetGroup,
    console,
    database_option,
    default_database,
    pki_option,
    print_json,
    run,
)

ACTOR = "cli"


def _assignment(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> dict:
    files: dict[str, str] = {}
    for item in values:
        name, equals, value = item.partition("=")
        if not equals or not name:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE")
        if name in files:
            raise click.BadParameter(f"{name} is given twice")
        files[name] = value
    return files


def _scope(factory_wide: bool, group: str | None, device: str | None) -> tuple[ConfigScope, str]:
    chosen = [c for c in (factory_wide, group, device) if c]
    if len(chosen) != 1:
        raise click.UsageError("choose one scope: --factory-wide, --group G or --device UUID")
    if device:
        return ConfigScope.DEVICE, device
    if group:
        return ConfigScope.GROUP, group
    return ConfigScope.FACTORY, ""


@click.group(cls=CertfleetGroup)
def config() -> None:
    """Config files devices fetch from the gateway (factory, group and device scope)."""


@config.command("set")
@click.argument(
    "assignments", nargs=-1, required=True, callback=_assignment, metavar="NAME=VALUE..."
)
@click.option("--factory-wide", is_flag=True, help="For every device of the factory.")
@click.option("--group", metavar="G", help="For the devices of group G.")
@click.option("--device", metavar="UUID", help="For one device (encrypted to its current key).")
@click.option("--unencrypted", is_flag=True, help="Serve the values in clear.")
@click.option(
    "--on-changed",
    multiple=True,
    metavar="CMD",
    help="Command the device runs when a file changes (repeatable; one argument each).",
)
@click.option("--reason", required=True, help="Why; kept in the config log.")
@click.option("--factory", help="Factory name; needed only when the store holds several.")
@pki_option
@database_option
def config_set(
    assignments: dict[str, str],
    factory_wide: bool,
    group: str | None,
    device: str | None,
    unencrypted: bool,
    on_changed: tuple[str, ...],
    reason: str,
    factory: str | None,
    pki_dir: Path,
    database: str | None,
) -> None:
    """Create or replace config files NAME with VALUE in one scope."""
    scope, key = _scope(factory_wide, group, device)
    files = {
        name: ConfigValue(value, list(on_changed), unencrypted)
        for name, value in assignments.items()
    }
    done = run(
        config_admin.set_config,
        database or default_database(pki_dir),
        scope,
        key,
        files,
        reason=reason,
        actor=ACTOR,
        factory=factory,
    )
    where = f"{done.scope} {done.key}" if done.key else f"factory {done.factory}"
    how = (
        f", encrypted to its current key (sha256 {done.encrypted_to[:16]}…)"
        if done.encrypted_to
        else ""
    )
    click.echo(f"config {', '.join(done.files)} set for {where}{how}")


@config.command("log")
@click.option("--device", metavar="UUID", help="The changes of one device's files.")
@click.option("--group", metavar="G", help="The changes of one group's files.")
@click.option("--factory", help="Factory name; needed only when the store holds several.")
@click.option("--limit", default=50, show_default=True, help="At most this many changes.")
@pki_option
@database_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def config_log(
    device: str | None,
    group: str | None,
    factory: str | None,
    limit: int,
    pki_dir: Path,
    database: str | None,
    as_json: bool,
) -> None:
    """Changes to the factory-wide files (or a group's, or a device's), newest first."""
    changes = run(
        config_admin.config_log,
        database or default_database(pki_dir),
        device=device,
        group=group,
        factory=factory,
        limit=limit,
    )
    if as_json:
        print_json([change.as_dict() for change in changes])
        return
    table = Table(title="Config changes")
    for column in ("when", "by", "files", "reason"):
        table.add_column(column, no_wrap=column == "when")
    for change in changes:
        table.add_row(
            f"{change.changed_at:%Y-%m-%d %H:%M:%S}",
            change.changed_by,
            ", ".join(change.files),
            change.reason,
        )
    console.print(table)
