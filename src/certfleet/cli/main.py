"""The operator command `certfleet <noun> <verb>`."""

from __future__ import annotations

import logging

import click

from certfleet import __version__
from certfleet.store.errors import StoreError

from .campaign_commands import campaigns
from .common import CertfleetGroup, register_user_errors
from .config_commands import config
from .db_commands import db
from .devices_commands import devices
from .est_commands import est
from .events_commands import events
from .keys_commands import keys
from .quickstart import quickstart
from .report_commands import report
from .rotate_certs_commands import device_config, group_rotate_certs
from .server_command import server
from .tokens_commands import tokens


@click.group(cls=CertfleetGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="certfleet")
@click.option("-v", "--verbose", is_flag=True, help="Log what happens to stderr.")
def cli(verbose: bool) -> None:
    """certfleet: keep the X.509 identities of a device fleet fresh."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


register_user_errors(StoreError)
cli.add_command(keys)
cli.add_command(db)
cli.add_command(est)
cli.add_command(config)
cli.add_command(devices)
cli.add_command(events)
cli.add_command(quickstart)
cli.add_command(report)
cli.add_command(server)
cli.add_command(tokens)
cli.add_command(campaigns)
config.add_command(group_rotate_certs)
devices.add_command(device_config)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="certfleet")
