"""`certfleet devices ...`: list, show, delete and deny devices, and their update timelines.

Each command works on the store (local mode, `--pki`/`--database`) or through
the admin API (remote mode, when a server is configured: see api_client.py).
"""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table

from certfleet.fleet.device_views import STATUSES, timeline_line

from .common import CertfleetGroup, console, print_json
from .fleet_backend import all_devices, all_updates, fleet_from, fleet_options


def _day(moment: str | None) -> str:
    # RFC 3339 from the API: the date and minutes are what a person scans for.
    return moment[:16].replace("T", " ") if moment else ""


@click.group(cls=CertfleetGroup)
def devices() -> None:
    """Devices of the fleet."""


@devices.command("list")
@click.option("--group", metavar="G", help="Only devices of group G.")
@click.option(
    "--expiring-within",
    metavar="DURATION",
    help="Only devices whose certificate expires within this (30d, 2w, 12h).",
)
@click.option("--status", type=click.Choice(STATUSES), help="Only devices in this status.")
@click.option("--limit", type=click.IntRange(min=1), help="Show at most this many.")
@fleet_options
def list_(
    group: str | None,
    expiring_within: str | None,
    status: str | None,
    limit: int | None,
    as_json: bool,
    **where: Any,
) -> None:
    """List devices (deleted ones only with --status deleted), in uuid order."""
    filters = {"group": group, "status": status, "expiring_within": expiring_within}
    items = all_devices(fleet_from(where), {k: v for k, v in filters.items() if v}, limit)
    if as_json:
        print_json(items)
        return
    table = Table(title=f"devices ({len(items)})")
    for column in ("uuid", "group", "status", "expires", "days", "last seen"):
        table.add_column(
            column, no_wrap=column == "uuid", justify="right" if column == "days" else "left"
        )
    for item in items:
        cert = item["cert"] or {}
        table.add_row(
            item["uuid"],
            item["group"] or "",
            item["status"],
            (cert.get("not_after") or "")[:10],
            str(cert.get("days_left", "")),
            (item["last_seen_at"] or "never")[:10],
        )
    console.print(table)


@devices.command("show")
@click.argument("device", metavar="UUID")
@fleet_options
def show(device: str, as_json: bool, **where: Any) -> None:
    """A device: current certificate, expiry, last seen, config lock, last rotation."""
    info = fleet_from(where).device(device)
    if as_json:
        print_json(info)
        return
    console.print(_show_table(info))


def _show_table(info: dict[str, Any]) -> Table:
    cert = info["cert"] or {}
    rotation = info["rotation"] or {}
    rows = [
        ("uuid", info["uuid"]),
        ("factory / group", f"{info['factory']} / {info['group'] or '-'}"),
        ("status", info["status"]),
        ("registered", f"{_day(info['created_at'])} ({info['registered_via']})"),
        ("last seen", _day(info["last_seen_at"]) or "never"),
        ("certificate", f"serial {cert['serial']} from {cert['issuer']}" if cert else "none"),
        ("expires", f"{_day(cert['not_after'])} ({cert['days_left']} days)" if cert else ""),
        ("sha256", cert.get("sha256", "")),
        ("config lock", _lock(info)),
        ("last rotation", _rotation(rotation)),
        ("certificates", str(info["certificates"])),
    ]
    if info["deleted_at"]:
        rows.append(("deleted", _day(info["deleted_at"])))
    table = Table(show_header=False, box=None)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for name, value in rows:
        table.add_row(name, value)
    return table


def _lock(info: dict[str, Any]) -> str:
    if not info["config_locked"]:
        return "unlocked"
    return f"locked: rotating to key sha256 {info['next_pubkey_sha256']}"


def _rotation(rotation: dict[str, Any]) -> str:
    if not rotation:
        return "none"
    step = f", last step {rotation['last_step']}" if rotation["last_step"] else ""
    return f"{rotation['id']} {rotation['status']} (updated {_day(rotation['updated_at'])}{step})"


@devices.command("delete")
@click.argument("device", metavar="UUID")
@click.option("--reason", default="deleted by the operator", show_default=True, help="Why.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@fleet_options
def delete(device: str, reason: str, yes: bool, as_json: bool, **where: Any) -> None:
    """Delete a device: refused from now on, its active certificates deny-listed.

    Its records and history stay, and its uuid cannot be registered again.
    """
    fleet = fleet_from(where)
    if not yes:
        click.confirm(f"Delete device {device} and deny-list its certificates?", abort=True)
    deleted = fleet.delete(device, reason)
    if as_json:
        print_json(deleted)
        return
    click.echo(f"deleted device {deleted['uuid']} at {deleted['deleted_at']}")
    for entry in deleted["denied"]:
        click.echo(f"denied: certificate serial {entry['serial']} (sha256 {entry['sha256']})")


@devices.command("move")
@click.argument("device", metavar="UUID")
@click.option("--group", metavar="G", help="The device's new group.")
@click.option("--no-group", is_flag=True, help="Take the device out of any group.")
@click.option("--reason", required=True, help="Why; kept in the config log.")
@fleet_options
def move(
    device: str, group: str | None, no_group: bool, reason: str, as_json: bool, **where: Any
) -> None:
    """Move device UUID to group G; it fetches G's config files at its next check-in."""
    if (group is not None) == no_group:
        raise click.UsageError("give --group G or --no-group")
    moved = fleet_from(where).move(device, group or "", reason)
    if as_json:
        print_json(moved)
    elif moved["moved"]:
        click.echo(f"device {device} moved to {f'group {group}' if group else 'no group'}")
    else:
        click.echo(f"device {device} is in {f'group {group}' if group else 'no group'} already")


@devices.command("unlock")
@click.argument("device", metavar="UUID")
@click.option("--reason", required=True, help="Why; kept in the audit log.")
@fleet_options
def unlock(device: str, reason: str, as_json: bool, **where: Any) -> None:
    """Withdraw the next key device UUID announced, which unlocks its config.

    For a rotation that will not finish. If the device goes on with it, the
    gateway refuses the new key and the device rolls back to its old one.
    """
    unlocked = fleet_from(where).unlock(device, reason)
    if as_json:
        print_json(unlocked)
    elif unlocked["unlocked"]:
        sha = unlocked["withdrawn_pubkey_sha256"]
        click.echo(f"device {device} unlocked: next key sha256 {sha} withdrawn")
    else:
        click.echo(f"device {device} has no next key announced; its config is not locked")


@devices.command("deny")
@click.argument("device", required=False, metavar="[UUID]")
@click.option("--serial", metavar="S", help="Deny the certificate with this hex serial.")
@click.option("--sha256", metavar="F", help="Deny the certificate with this fingerprint.")
@click.option("--reason", required=True, help="Why; kept with each deny-list entry.")
@fleet_options
def deny(
    device: str | None,
    serial: str | None,
    sha256: str | None,
    reason: str,
    as_json: bool,
    **where: Any,
) -> None:
    """Deny-list a certificate (--serial or --sha256) or every active certificate of UUID.

    Every gateway process refuses it within about a second.
    """
    if sum(x is not None for x in (device, serial, sha256)) != 1:
        raise click.UsageError("give exactly one of UUID, --serial S or --sha256 F")
    fleet = fleet_from(where)
    if device is None:
        denied = fleet.deny_certificate(reason, serial, sha256)
    else:
        denied = fleet.deny(device, reason)
    if as_json:
        print_json(denied)
        return
    for entry in denied:
        what = f"serial {entry['serial']} " if entry["serial"] else ""
        owner = f" of device {entry['device']}" if entry["device"] else ""
        state = "denied" if entry["new"] else f"already denied ({entry['reason']})"
        click.echo(f"{state}: certificate {what}(sha256 {entry['sha256']}){owner}")


@devices.command("updates")
@click.argument("device", metavar="UUID")
@click.argument("correlation_id", metavar="[ID]", required=False)
@fleet_options
def updates(device: str, correlation_id: str | None, as_json: bool, **where: Any) -> None:
    """A device's updates (rotations are certs-<time> or auto-<time>), or the events of update ID.

    The events print as `<time> : <step>(<target>) -> Succeed|Failed!`.
    """
    fleet = fleet_from(where)
    if correlation_id is None:
        found = all_updates(fleet, device)
        if as_json:
            print_json(found)
        else:
            console.print(_updates_table(device, found))
        return
    timeline = fleet.timeline(device, correlation_id)
    if as_json:
        print_json(timeline)
        return
    for event in timeline["events"]:
        click.echo(timeline_line(event))


def _updates_table(device: str, found: list[dict[str, Any]]) -> Table:
    table = Table(title=f"updates of {device}")
    for column in ("id", "kind", "status", "started", "updated", "events"):
        table.add_column(column, no_wrap=True)
    for item in found:
        table.add_row(
            item["correlation_id"],
            item["kind"],
            item["status"],
            _day(item["created_at"]),
            _day(item["updated_at"]),
            str(item["events"]),
        )
    return table
