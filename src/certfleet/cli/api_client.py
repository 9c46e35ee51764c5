"""The CLI's client of the admin API, and how it finds its server and token.

A server is named by `--server URL`, `$CERTFLEET_SERVER` or `server` in the
CLI config file (`$CERTFLEET_CLI_CONFIG`, else
`$XDG_CONFIG_HOME/certfleet/cli.toml`, else `~/.config/certfleet/cli.toml`);
the token likewise by `--token`, `$CERTFLEET_TOKEN` or `token`, and the CA
to trust by `--trust`, `$CERTFLEET_TRUST` or `trust`. The token is sent in
the Authorization header only; it is never printed, logged or put in an
error message.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from .common import err_console

TIMEOUT_SECONDS = 60
CONFIG_KEYS = ("server", "token", "trust")


class ApiClientError(click.ClickException):
    """The API refused a request or could not be reached; one line for the operator."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        err_console.print(f"[red]error:[/red] {escape(self.message)}", highlight=False)


@dataclass(frozen=True)
class Remote:
    """Where the admin API is and how to authenticate to it."""

    server: str
    token: str = field(repr=False)
    trust: Path | None = None


def config_path() -> Path:
    """The CLI config file (it need not exist)."""
    explicit = os.environ.get("CERTFLEET_CLI_CONFIG")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "certfleet" / "cli.toml"


def _read_config() -> dict[str, Any]:
    path = config_path()
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ApiClientError(f"cannot read {path}: {exc}") from exc
    unknown = sorted(set(data) - set(CONFIG_KEYS))
    if unknown:
        raise ApiClientError(f"unknown key(s) in {path}: {', '.join(unknown)}")
    if "token" in data and path.stat().st_mode & 0o077:
        err_console.print(f"warning: {path} holds a token and others may read it (chmod 600)")
    return data


def resolve_remote(server: str | None, token: str | None, trust: Path | None) -> Remote | None:
    """The API to use, or None for local mode (no server named anywhere)."""
    config = _read_config()
    server = server or os.environ.get("CERTFLEET_SERVER") or config.get("server")
    if not server:
        return None
    token = token or os.environ.get("CERTFLEET_TOKEN") or config.get("token")
    if not token:
        raise ApiClientError(
            f"no API token for {server}: pass --token, set CERTFLEET_TOKEN or put token = "
            f"'...' in {config_path()}"
        )
    trusted = trust or os.environ.get("CERTFLEET_TRUST") or config.get("trust")
    return Remote(server.rstrip("/"), token, Path(trusted) if trusted else None)


def remote_options(fn: Callable) -> Callable:
    """`--server`, `--token`, `--trust` and `--local` for commands that work both ways."""
    options = [
        click.option(
            "--server",
            metavar="URL",
            help="Admin API to use (default $CERTFLEET_SERVER or the CLI config file); "
            "without one the store is used directly.",
        ),
        click.option(
            "--token",
            metavar="TOKEN",
            help="API token (prefer $CERTFLEET_TOKEN: command lines are visible to others).",
        ),
        click.option(
            "--trust",
            type=click.Path(dir_okay=False, exists=True, path_type=Path),
            help="CA certificate(s) to verify the server with, e.g. pki/root.crt.",
        ),
        click.option(
            "--local", is_flag=True, help="Use the store even when a server is configured."
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


class ApiClient:
    """Synchronous JSON calls to the admin API."""

    def __init__(self, remote: Remote) -> None:
        self.remote = remote
        parsed = urllib.parse.urlsplit(remote.server)
        if parsed.scheme not in ("https", "http") or not parsed.hostname:
            raise ApiClientError(f"server {remote.server!r} must be an https:// (or http://) URL")
        self._parsed = parsed

    def _connection(self) -> http.client.HTTPConnection:
        host, port = self._parsed.hostname, self._parsed.port
        if self._parsed.scheme == "http":
            return http.client.HTTPConnection(host, port, timeout=TIMEOUT_SECONDS)
        trust = str(self.remote.trust) if self.remote.trust else None
        context = ssl.create_default_context(cafile=trust)
        return http.client.HTTPSConnection(host, port, timeout=TIMEOUT_SECONDS, context=context)

    def call(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
    ) -> Any:
        """The decoded JSON answer; ApiClientError with the server's reason on a refusal."""
        target = self._parsed.path.rstrip("/") + path
        wanted = {k: v for k, v in (query or {}).items() if v is not None}
        if wanted:
            target += "?" + urllib.parse.urlencode(wanted)
        headers = {"Authorization": f"Bearer {self.remote.token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        connection = self._connection()
        try:
            connection.request(method, target, body=data, headers=headers)
            response = connection.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ApiClientError(f"cannot reach {self.remote.server}: {exc}") from exc
        finally:
            connection.close()
        return _decoded(response, raw, method, path)


def _decoded(response: http.client.HTTPResponse, raw: bytes, method: str, path: str) -> Any:
    try:
        answer = json.loads(raw) if raw else None
    except ValueError:
        answer = None
    if response.status < 400:
        if answer is None:
            raise ApiClientError(f"{method} {path}: the server answered no JSON")
        return answer
    reason = answer.get("message") if isinstance(answer, dict) else None
    request_id = response.getheader("X-Request-ID", "?")
    text = reason or raw.decode(errors="replace").strip()[:200] or response.reason
    raise ApiClientError(f"{text} (HTTP {response.status}, request {request_id})")


def quote(part: str) -> str:
    """A path segment, escaped."""
    return urllib.parse.quote(part, safe="")
