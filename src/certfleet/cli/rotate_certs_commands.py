"""The reference's rotation verbs: `devices config rotate-certs UUID` and `config rotate-certs`.

One device gets its `fio-rotate-certs` file at once; a group becomes a
campaign (canaries first, then waves), like `certfleet campaigns create`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from certfleet.fleet import rotate_certs
from certfleet.fleet.campaigns import Selector

from .campaign_commands import campaign_options, create_and_report, order_of, order_options
from .common import CertfleetGroup, database_option, pki_option, print_json, run, store_url

ACTOR = "cli"


@click.group("config", cls=CertfleetGroup)
def device_config() -> None:
    """One device's config files."""


@device_config.command("rotate-certs")
@click.argument("device", metavar="UUID")
@click.option("--reason", required=True, help="Why; kept in the config log.")
@order_options
@click.option("--dryrun", is_flag=True, help="Show the file that would be set; change nothing.")
@pki_option
@database_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def rotate_device(
    device: str,
    reason: str,
    dryrun: bool,
    pki_dir: Path,
    database: str | None,
    as_json: bool,
    **values: Any,
) -> None:
    """Make device UUID renew its key and certificate now (sets fio-rotate-certs).

    Refused while the device is in the middle of a key change.
    """
    done = run(
        rotate_certs.rotate_device,
        store_url(pki_dir, database),
        device,
        order_of(values),
        reason=reason,
        actor=ACTOR,
        dryrun=dryrun,
    )
    if as_json:
        print_json(done.as_dict())
        return
    verb = "dry run: would set" if dryrun else "set"
    click.echo(
        f"{verb} config file {rotate_certs.ROTATE_FILE} for device {done.device} "
        f"(on change: {rotate_certs.HANDLER}):"
    )
    click.echo("".join(f"  {line}\n" for line in done.order.value().splitlines()), nl=False)
    if dryrun:
        click.echo("nothing was changed")
    else:
        click.echo(
            f"rotation {done.order.rotation_id} starts when the device next fetches its config; "
            f"follow it with: certfleet events tail --device {done.device}"
        )


@click.command("rotate-certs")
@click.option("--group", required=True, metavar="G", help="Rotate the devices of group G.")
@click.option("--reason", required=True, help="Why; kept with the campaign and the config log.")
@campaign_options
@order_options
@click.option("--dryrun", is_flag=True, help="Show the devices and the file; change nothing.")
@click.option("--factory", help="Factory name; needed only when the store holds several.")
@pki_option
@database_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def group_rotate_certs(
    group: str,
    reason: str,
    dryrun: bool,
    factory: str | None,
    pki_dir: Path,
    database: str | None,
    as_json: bool,
    **values: Any,
) -> None:
    """Rotate every device of group G as a campaign: canaries first, then waves."""
    create_and_report(
        store_url(pki_dir, database),
        Selector(group=group),
        values,
        reason=reason,
        factory=factory,
        dryrun=dryrun,
        as_json=as_json,
    )
