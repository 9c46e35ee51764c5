"""`certfleet-agent rotate`: rotate the device's key and certificate, resume, abandon, show.

Exit codes: 0 done (or nothing to do), 1 the rotation failed, is paused or is
busy, 2 bad input (options, agent.toml, the request).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from certfleet.agent.rotation import (
    INVALID,
    Outcome,
    abandon_unfinished,
    resume_unfinished,
    rotation_status,
)
from certfleet.agent.rotation import rotate as run_rotation
from certfleet.agent.rotation_request import RequestError, make_request
from certfleet.agent.settings import AgentSettings, SettingsError, load_settings

OK, FAILURE, BAD_INPUT = 0, 1, 2


@click.command("rotate")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="agent.toml (default /etc/certfleet/agent.toml if it exists).",
)
@click.option("--est-server", metavar="URL", help="EST server; default [renewal] est_server.")
@click.option("--rotation-id", metavar="ID", help="Default certs-<unix time>.")
@click.option("--resume", is_flag=True, help="Finish the unfinished rotation now.")
@click.option("--abandon", metavar="REASON", help="Stop the unfinished rotation, undoing it.")
@click.option("--status", "show_status", is_flag=True, help="Show the journal and exit.")
@click.option("--json", "as_json", is_flag=True, help="With --status: JSON.")
@click.option("--pkey-ids", metavar="HEX,HEX", help="Token key slots to alternate (PKEYIDS).")
@click.option("--cert-ids", metavar="HEX,HEX", help="Token certificate slots (CERTIDS).")
@click.option(
    "--replace-next-key",
    is_flag=True,
    help="Replace a next key announced by no rotation in this journal (journal lost).",
)
def rotate(
    config_path: Path | None,
    est_server: str | None,
    rotation_id: str | None,
    resume: bool,
    abandon: str | None,
    show_status: bool,
    as_json: bool,
    pkey_ids: str | None,
    cert_ids: str | None,
    replace_next_key: bool,
) -> None:
    """Rotate this device's key and certificate (crash-safe; resumable)."""
    if sum([resume, abandon is not None, show_status]) > 1:
        raise click.UsageError("give at most one of --resume, --abandon, --status")
    settings = _settings(config_path)
    if show_status:
        _print_status(settings, as_json)
        return
    if resume:
        _finish(resume_unfinished(settings, force=True), "no unfinished rotation")
    elif abandon is not None:
        _finish(abandon_unfinished(settings, abandon), "no unfinished rotation", abandoning=True)
    else:
        slots = (pkey_ids, cert_ids)
        _finish(_start(settings, est_server, rotation_id, slots, replace_next_key), "")


def _settings(config_path: Path | None) -> AgentSettings:
    try:
        return load_settings(config_path)
    except SettingsError as exc:
        _fail(str(exc), BAD_INPUT)
    raise AssertionError("unreachable")


def _start(
    settings: AgentSettings,
    est_server: str | None,
    rotation_id: str | None,
    slots: tuple[str | None, str | None],
    replace: bool,
) -> Outcome:
    server = est_server or settings.renewal.est_server
    if not server:
        _fail("give --est-server URL (or set [renewal] est_server in agent.toml)", BAD_INPUT)
    try:
        request = make_request(
            rotation_id or f"certs-{int(time.time())}",
            server or "",
            pkey_ids=slots[0],
            cert_ids=slots[1],
            origin="certfleet-agent rotate",
            replace_next_key=replace,
        )
    except RequestError as exc:
        _fail(str(exc), BAD_INPUT)
    return run_rotation(settings, request)


def _finish(outcome: Outcome | None, nothing: str, abandoning: bool = False) -> None:
    if outcome is None:
        click.echo(nothing)
        return
    line = f"rotation {outcome.rotation_id or '-'} {outcome.status}: {outcome.message}"
    if outcome.ok or (abandoning and outcome.status == "abandoned"):
        click.echo(line)
        return
    _fail(line, BAD_INPUT if outcome.status == INVALID else FAILURE)


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _print_status(settings: AgentSettings, as_json: bool) -> None:
    found = rotation_status(settings)
    if as_json:
        click.echo(json.dumps(found, indent=2, sort_keys=True))
        return
    if not found:
        click.echo("no rotations yet")
    for entry in found:
        click.echo(_status_line(entry))


def _status_line(entry: dict[str, Any]) -> str:
    done = sum(1 for _, result in entry["steps"] if result == "done")
    line = f"{entry['rotation_id']}: {entry['state']}, {done}/5 steps done"
    line += f", started {entry['started_at']}"
    if entry["retry"]:
        line += f"; paused ({entry['retry']['error']}), next try after {entry['retry']['next_at']}"
    if entry["summary"]:
        line += f"; {entry['summary']}"
    if entry["state"] != "in_progress" and not entry["events_delivered"]:
        line += "; events not delivered yet"
    return line
