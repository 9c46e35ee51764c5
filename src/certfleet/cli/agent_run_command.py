"""`certfleet-agent run` (the config daemon) and `certfleet-agent install-files`.

Both report their own errors (one line, exit code 2) instead of going through the
shared CLI module: that module loads rich, and the daemon must start cheaply.
"""

from __future__ import annotations

import logging
import sys
from importlib import resources
from pathlib import Path
from typing import NoReturn

import click

from certfleet.agent.config_daemon import ConfigDaemon, Status, StopSignal
from certfleet.agent.settings import SettingsError, load_settings
from certfleet.pki.files import write_atomic

log = logging.getLogger("certfleet.agent.run")

UNIT_FILE = "certfleet-agent.service"
EXAMPLE_FILE = "agent.toml.example"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


@click.command("run")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="agent.toml (default /etc/certfleet/agent.toml if it exists, else built-in defaults).",
)
@click.option("--once", is_flag=True, help="One cycle, then exit 0 (done), 1 (retry) or 2 (act).")
@click.option(
    "--log-level",
    type=click.Choice(sorted(LEVELS)),
    default="info",
    show_default=True,
    help="What the agent logs to stderr (file names and versions, never values).",
)
def run(config_path: Path | None, once: bool, log_level: str) -> None:
    """Poll the gateway for config, write the files, run their handlers."""
    stop = StopSignal()
    try:
        daemon = ConfigDaemon(load_settings(config_path), stop)
    except SettingsError as exc:
        _fail(str(exc))
    # After the settings are read: a refusal is then said once, as the error line.
    logging.getLogger("certfleet").setLevel(LEVELS[log_level])
    stop.install()
    if not once:
        daemon.run_forever()
        return
    report = daemon.cycle_safely()
    if report.status is Status.RETRY:
        log.warning("%s; try again later", report.reason)
    elif report.status is Status.REFUSED:
        log.error("%s", report.reason)
    sys.exit(report.exit_code)


@click.command("install-files")
@click.option(
    "--dest",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to write certfleet-agent.service and agent.toml.example into.",
)
@click.option("--force", is_flag=True, help="Replace files already in --dest.")
def install_files(dest: Path, force: bool) -> None:
    """Write the systemd unit and an example agent.toml (every setting, its default)."""
    data = resources.files("certfleet.agent") / "data"
    targets = [dest / UNIT_FILE, dest / EXAMPLE_FILE]
    present = [str(path) for path in targets if path.exists()]
    if present and not force:
        raise click.UsageError(f"{', '.join(present)} exist(s); use --force to replace")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for path in targets:
            write_atomic(path, (data / path.name).read_bytes(), 0o644)
            click.echo(str(path))
    except OSError as exc:
        _fail(f"cannot write into {dest}: {exc.strerror or exc}")


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)
