"""What every certfleet command shares: options, error reporting, output."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape

from certfleet import durations
from certfleet.pki.errors import PkiError

T = TypeVar("T")
console = Console()
err_console = Console(stderr=True)
log = logging.getLogger("certfleet.cli")

USER_ERRORS: tuple[type[Exception], ...] = (PkiError,)


def register_user_errors(*kinds: type[Exception]) -> None:
    """Mark exception types whose message is for the user (exit 2, no traceback)."""
    global USER_ERRORS
    USER_ERRORS = USER_ERRORS + kinds


class CertfleetGroup(click.Group):
    """A click group that turns user errors into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except USER_ERRORS as exc:
            log.info("refused: %s", exc)
            # escape(): messages quote user input and TOML tables like [est], not markup.
            err_console.print(
                f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True
            )
            sys.exit(2)


def run(coro_fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
    """Run an async service call from a command."""
    return asyncio.run(coro_fn(*args, **kwargs))


def default_database(pki_dir: Path) -> str:
    """The store used when none is named: a SQLite file beside the PKI."""
    return (
        os.environ.get("CERTFLEET_DATABASE_URL")
        or f"sqlite:///{Path(pki_dir).resolve()}/certfleet.db"
    )


def database_option(fn: Callable) -> Callable:
    """`--database URL`, defaulting to $CERTFLEET_DATABASE_URL or <pki>/certfleet.db."""
    return click.option(
        "--database",
        "database",
        metavar="URL",
        default=None,
        help="sqlite:///path or postgresql://...; default $CERTFLEET_DATABASE_URL or "
        "<pki>/certfleet.db",
    )(fn)


def pki_option(fn: Callable) -> Callable:
    """`--pki DIR`, defaulting to $CERTFLEET_PKI or ./pki."""
    return click.option(
        "--pki",
        "pki_dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=lambda: os.environ.get("CERTFLEET_PKI", "pki"),
        show_default="$CERTFLEET_PKI or ./pki",
        help="Folder made by `certfleet keys ca create`.",
    )(fn)


def print_json(data: Any) -> None:
    """Machine-readable output for --json."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def parse_duration(text: str) -> dt.timedelta:
    """'90s', '30m', '12h', '7d' or '2w' as a timedelta; a usage error otherwise."""
    try:
        return durations.parse_duration(text)
    except ValueError as exc:
        raise click.BadParameter(f"{text!r} {exc}") from exc


async def with_store(url: str, action: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Open the store (migrated), run `action(store, *args)`, close it."""
    # Imported here: certfleet-agent shares this module and must not load the store.
    from certfleet.store.engine import open_store

    store = await open_store(url, upgrade=True)
    try:
        return await action(store, *args)
    finally:
        await store.close()


def store_url(pki_dir: Path, database: str | None) -> str:
    """The --database given, else the default beside the PKI."""
    return database or default_database(pki_dir)
