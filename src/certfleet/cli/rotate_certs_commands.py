"""The reference's rotation verbs: `devices config rotate-certs UUID` and `config rotate-certs`.

One device gets its `fio-rotate-certs` file at once; a group becomes a
campaign (canaries first, then waves), like `certfleet campaigns create`.
Both work on the store or, when a server is configured, through the admin API.
"""

from __future__ import annotations

from typing import Any

import click

from certfleet.fleet.campaigns import Selector

from .campaign_backend import campaigns_from
from .campaign_commands import campaign_options, campaign_where, create_and_report, order_options
from .common import CertfleetGroup, print_json
from .fleet_backend import fleet_from, fleet_options

# The options of `order_options`, passed on as given (the fleet checks them).
ORDER_OPTIONS = ("est_server", "hsm_pkey_ids", "hsm_cert_ids")


@click.group("config", cls=CertfleetGroup)
def device_config() -> None:
    """One device's config files."""


@device_config.command("rotate-certs")
@click.argument("device", metavar="UUID")
@click.option("--reason", required=True, help="Why; kept in the config log.")
@order_options
@click.option("--dryrun", is_flag=True, help="Show the file that would be set; change nothing.")
@fleet_options
def rotate_device(device: str, reason: str, dryrun: bool, as_json: bool, **values: Any) -> None:
    """Make device UUID renew its key and certificate now (sets fio-rotate-certs).

    Refused while the device is in the middle of a key change.
    """
    order = {name: values.pop(name) for name in ORDER_OPTIONS}
    done = fleet_from(values).rotate(device, order, reason, dryrun)
    if as_json:
        print_json(done)
        return
    verb = "dry run: would set" if dryrun else "set"
    handlers = ", ".join(done["on_changed"])
    click.echo(
        f"{verb} config file {done['file']} for device {done['device']} (on change: {handlers}):"
    )
    click.echo("".join(f"  {line}\n" for line in done["value"].splitlines()), nl=False)
    if dryrun:
        click.echo("nothing was changed")
    else:
        click.echo(
            f"rotation {done['rotation_id']} starts when the device next fetches its config; "
            f"follow it with: certfleet events tail --device {done['device']}"
        )


@click.command("rotate-certs")
@click.option("--group", required=True, metavar="G", help="Rotate the devices of group G.")
@click.option("--reason", required=True, help="Why; kept with the campaign and the config log.")
@campaign_options
@order_options
@click.option("--dryrun", is_flag=True, help="Show the devices and the file; change nothing.")
@click.option("--factory", help="Factory name; needed only when the store holds several.")
@campaign_where
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def group_rotate_certs(
    group: str,
    reason: str,
    dryrun: bool,
    factory: str | None,
    as_json: bool,
    **values: Any,
) -> None:
    """Rotate every device of group G as a campaign: canaries first, then waves.

    In remote mode this is POST /v1/campaigns with {"group": G}, as `campaigns create --group`.
    """
    create_and_report(
        campaigns_from(values, factory),
        Selector(group=group),
        values,
        reason=reason,
        dryrun=dryrun,
        as_json=as_json,
    )
