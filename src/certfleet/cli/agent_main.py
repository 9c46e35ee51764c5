"""The device command `certfleet-agent <noun> <verb>`.

Subcommands are imported when they are run: `rotate` must stay cheap on a
small device, and the EST and registration commands pull in aiohttp and rich,
whose import alone costs more CPU than a whole rotation may.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click

from certfleet import __version__

COMMON = "certfleet.cli.common"
COMMANDS = {
    "est": ("certfleet.cli.agent_est_commands", "est"),
    "register": ("certfleet.cli.agent_register_command", "register"),
    "rotate": ("certfleet.cli.agent_rotate_command", "rotate"),
    "run": ("certfleet.cli.agent_run_command", "run"),
    "install-files": ("certfleet.cli.agent_run_command", "install_files"),
}
# These report their own errors and must not load the shared CLI module (rich).
SELF_CONTAINED = {"rotate", "run", "install-files"}


class AgentGroup(click.Group):
    """Loads a subcommand on use; user errors of the shared commands exit 2 in one line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module_name, attribute = COMMANDS[cmd_name]
        command = getattr(importlib.import_module(module_name), attribute)
        if cmd_name not in SELF_CONTAINED:
            _register_shared_user_errors()
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            common = sys.modules.get(COMMON)
            if common is None or not isinstance(exc, common.USER_ERRORS):
                raise
            from rich.markup import escape

            common.log.info("refused: %s", exc)
            # escape(): messages quote user input and TOML tables like [est], not markup.
            common.err_console.print(
                f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True
            )
            sys.exit(2)


def _register_shared_user_errors() -> None:
    from certfleet.est.client import EstClientError
    from certfleet.est.wire import EstWireError

    from .agent_register_command import RegistrationFailed
    from .common import USER_ERRORS, register_user_errors

    wanted = (EstClientError, EstWireError, OSError, RegistrationFailed)
    missing = tuple(kind for kind in wanted if kind not in USER_ERRORS)
    if missing:
        register_user_errors(*missing)


@click.group(cls=AgentGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="certfleet-agent")
@click.option("-v", "--verbose", is_flag=True, help="Log what happens to stderr.")
def agent_cli(verbose: bool) -> None:
    """certfleet-agent: a device's side of certfleet."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main() -> None:
    """Console-script entry point."""
    agent_cli(prog_name="certfleet-agent")
