"""`certfleet config ...`: device config files at factory, group or device scope."""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table

from certfleet.store.schema import ConfigScope

from .common import CertfleetGroup, console, print_json
from .fleet_backend import fleet_from, fleet_options


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


def _scope(factory_wide: bool, group: str | None, device: str | None) -> dict[str, str]:
    chosen = [c for c in (factory_wide, group, device) if c]
    if len(chosen) != 1:
        raise click.UsageError("choose one scope: --factory-wide, --group G or --device UUID")
    if device:
        return {"scope": ConfigScope.DEVICE.value, "key": device}
    if group:
        return {"scope": ConfigScope.GROUP.value, "key": group}
    return {"scope": ConfigScope.FACTORY.value}


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
@fleet_options
def config_set(
    assignments: dict[str, str],
    factory_wide: bool,
    group: str | None,
    device: str | None,
    unencrypted: bool,
    on_changed: tuple[str, ...],
    reason: str,
    factory: str | None,
    as_json: bool,
    **where: Any,
) -> None:
    """Create or replace config files NAME with VALUE in one scope."""
    change = {
        **_scope(factory_wide, group, device),
        "files": assignments,
        "unencrypted": unencrypted or None,
        "on_changed": list(on_changed) or None,
        "reason": reason,
        "factory": factory,
    }
    done = fleet_from(where).set_config({k: v for k, v in change.items() if v is not None})
    if as_json:
        print_json(done)
        return
    where_to = f"{done['scope']} {done['key']}" if done["key"] else f"factory {done['factory']}"
    how = (
        f", encrypted to its current key (sha256 {done['encrypted_to'][:16]}…)"
        if done["encrypted_to"]
        else ""
    )
    click.echo(f"config {', '.join(done['files'])} set for {where_to}{how}")


@config.command("log")
@click.option("--device", metavar="UUID", help="The changes of one device's files.")
@click.option("--group", metavar="G", help="The changes of one group's files.")
@click.option("--factory", help="Factory name; needed only when the store holds several.")
@click.option("--limit", default=50, show_default=True, help="At most this many changes.")
@fleet_options
def config_log(
    device: str | None,
    group: str | None,
    factory: str | None,
    limit: int,
    as_json: bool,
    **where: Any,
) -> None:
    """Changes to the factory-wide files (or a group's, or a device's), newest first."""
    query = {"device": device, "group": group, "factory": factory, "limit": limit}
    changes = fleet_from(where).config_log({k: v for k, v in query.items() if v is not None})
    if as_json:
        print_json(changes)
        return
    table = Table(title="Config changes")
    for column in ("when", "by", "files", "reason"):
        table.add_column(column, no_wrap=column == "when")
    for change in changes:
        table.add_row(
            change["changed_at"].replace("T", " ")[:19],
            change["changed_by"],
            ", ".join(change["files"]),
            change["reason"],
        )
    console.print(table)
