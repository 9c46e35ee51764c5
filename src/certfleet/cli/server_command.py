"""`certfleet server`: run the EST server (and, as they land, the gateway and API)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import console


@click.command("server")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="TOML file with the settings below (flags win).",
)
@click.option(
    "--pki",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder made by `keys ca create` (default ./pki).",
)
@click.option("--database", metavar="URL", help="Default: <pki>/certfleet.db (SQLite).")
@click.option("--listen-est", metavar="HOST:PORT", help="Default 127.0.0.1:8443.")
@click.option("--listen-gateway", metavar="HOST:PORT", help="Default 127.0.0.1:8444.")
@click.option(
    "--gateway-url",
    metavar="URL",
    help="Gateway URL devices are given (default https://<listen-gateway>).",
)
@click.option(
    "--listen-api",
    metavar="HOST:PORT",
    help="Admin API (default 127.0.0.1:8445; 'off' for none).",
)
@click.option(
    "--api-plain-http",
    is_flag=True,
    default=None,
    help="Serve the admin API without TLS (loopback addresses only).",
)
@click.option("--workers", type=int, help="Processes sharing the sockets (default 1).")
@click.option(
    "--tls-stack",
    type=click.Choice(["openssl4", "stdlib"]),
    help="openssl4 (default, faster handshakes) or the interpreter's ssl module.",
)
def server(
    config_file: Path | None,
    pki: Path | None,
    database: str | None,
    listen_est: str | None,
    listen_gateway: str | None,
    gateway_url: str | None,
    listen_api: str | None,
    api_plain_http: bool | None,
    workers: int | None,
    tls_stack: str | None,
) -> None:
    """Serve EST, the device gateway (mutual TLS) and the admin API until Ctrl-C or SIGTERM."""
    # Imported here so that `certfleet --help` stays fast.
    from certfleet.server import serve
    from certfleet.server_config import load_config

    config = load_config(
        config_file,
        {
            "pki": pki,
            "database": database,
            "listen_est": listen_est,
            "listen_gateway": listen_gateway,
            "gateway_url": gateway_url,
            "listen_api": "" if listen_api == "off" else listen_api,
            "workers": workers,
            "tls_stack": tls_stack,
        },
    )
    if api_plain_http:
        config.api = {**config.api, "tls": False}
    serve(config, announce=lambda line: console.print(line, highlight=False))
