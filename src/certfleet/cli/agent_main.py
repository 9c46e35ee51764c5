"""The device command `certfleet-agent <noun> <verb>`."""

from __future__ import annotations

import logging

import click

from certfleet import __version__
from certfleet.est.client import EstClientError
from certfleet.est.wire import EstWireError

from .agent_est_commands import est
from .agent_register_command import RegistrationFailed, register
from .common import CertfleetGroup, register_user_errors


@click.group(cls=CertfleetGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="certfleet-agent")
@click.option("-v", "--verbose", is_flag=True, help="Log what happens to stderr.")
def agent_cli(verbose: bool) -> None:
    """certfleet-agent: a device's side of certfleet."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


register_user_errors(EstClientError, EstWireError, OSError, RegistrationFailed)
agent_cli.add_command(est)
agent_cli.add_command(register)


def main() -> None:
    """Console-script entry point."""
    agent_cli(prog_name="certfleet-agent")
