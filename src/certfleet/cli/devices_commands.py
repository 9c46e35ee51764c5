"""`certfleet devices ...`: operator actions on single devices."""

from __future__ import annotations

from pathlib import Path

import click

from certfleet.fleet import denylist_admin

from .common import CertfleetGroup, database_option, default_database, pki_option, print_json, run

ACTOR = "cli"


@click.group(cls=CertfleetGroup)
def devices() -> None:
    """Devices of the fleet."""


@devices.command("deny")
@click.argument("device", required=False, metavar="[UUID]")
@click.option("--serial", metavar="S", help="Deny the certificate with this hex serial.")
@click.option("--sha256", metavar="F", help="Deny the certificate with this fingerprint.")
@click.option("--reason", required=True, help="Why; kept with each deny-list entry.")
@pki_option
@database_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def deny(
    device: str | None,
    serial: str | None,
    sha256: str | None,
    reason: str,
    pki_dir: Path,
    database: str | None,
    as_json: bool,
) -> None:
    """Deny-list a certificate (--serial or --sha256) or every active certificate of UUID.

    Every gateway process refuses it within about a second.
    """
    if sum(x is not None for x in (device, serial, sha256)) != 1:
        raise click.UsageError("give exactly one of UUID, --serial S or --sha256 F")
    denied = run(
        denylist_admin.deny,
        database or default_database(pki_dir),
        reason=reason,
        actor=ACTOR,
        serial=serial,
        sha256=sha256,
        device=device,
    )
    if as_json:
        print_json([entry.as_dict() for entry in denied])
        return
    for entry in denied:
        what = f"serial {entry.serial} " if entry.serial else ""
        owner = f" of device {entry.device_uuid}" if entry.device_uuid else ""
        state = "denied" if entry.new else f"already denied ({entry.reason})"
        click.echo(f"{state}: certificate {what}(sha256 {entry.sha256}){owner}")
