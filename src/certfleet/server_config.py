"""Settings of `certfleet server`: TOML file, then command-line overrides."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from certfleet.pki.errors import PkiError


@dataclass
class ServerConfig:
    """Everything a server process needs to start."""

    pki: Path = Path("pki")
    database: str | None = None
    listen_est: str = "127.0.0.1:8443"
    listen_gateway: str = "127.0.0.1:8444"
    # What devices are told to use (sota.toml); default: https://<listen_gateway>.
    gateway_url: str | None = None
    workers: int = 1
    tls_stack: str = "openssl4"
    hsm_pin: str | None = field(default=None, repr=False)
    est: dict[str, Any] = field(default_factory=dict)
    gateway: dict[str, Any] = field(default_factory=dict)
    events: dict[str, Any] = field(default_factory=dict)
    # [campaigns]: the rotation campaign runner (certfleet.fleet.campaigns.runner_settings).
    campaigns: dict[str, Any] = field(default_factory=dict)
    # The admin API; "" switches it off.
    listen_api: str = "127.0.0.1:8445"
    api: dict[str, Any] = field(default_factory=dict)

    @property
    def database_url(self) -> str:
        """The store: explicit, $CERTFLEET_DATABASE_URL, or SQLite beside the PKI."""
        return (
            self.database
            or os.environ.get("CERTFLEET_DATABASE_URL")
            or f"sqlite:///{self.pki.resolve()}/certfleet.db"
        )

    def check(self) -> None:
        """Refuse settings that cannot work, with a message naming the setting."""
        if not 1 <= self.workers <= 64:
            raise PkiError(f"workers must be between 1 and 64, not {self.workers}")
        if self.tls_stack not in ("openssl4", "stdlib"):
            raise PkiError(f"tls_stack must be openssl4 or stdlib, not {self.tls_stack!r}")
        parse_listen(self.listen_est)
        parse_listen(self.listen_gateway)
        if self.listen_est == self.listen_gateway:
            raise PkiError("listen_est and listen_gateway must differ")
        if self.listen_api:
            parse_listen(self.listen_api)
            if self.listen_api in (self.listen_est, self.listen_gateway):
                raise PkiError("listen_api must differ from listen_est and listen_gateway")
        if not (self.pki / "est-tls.crt").exists():
            raise PkiError(f"{self.pki} holds no factory PKI: run `certfleet keys ca create`")


def parse_listen(text: str) -> tuple[str, int]:
    """'HOST:PORT' (IPv6 as [::1]:PORT) into a pair, with a clear error."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise PkiError(f"listen address {text!r} must look like 127.0.0.1:8443")
    return host.strip("[]") or "0.0.0.0", int(port)


def load_config(path: Path | None, overrides: dict[str, Any]) -> ServerConfig:
    """Read a TOML file (optional) and apply non-None command-line overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise PkiError(f"cannot read server config {path}: {exc}") from exc
    known = {f.name for f in fields(ServerConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PkiError(f"unknown setting(s) in {path}: {', '.join(unknown)}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    if "pki" in data:
        data["pki"] = Path(data["pki"])
    config = ServerConfig(**data)
    config.hsm_pin = config.hsm_pin or os.environ.get("CERTFLEET_HSM_PIN")
    return config


def public_gateway_url(config: ServerConfig) -> str:
    """The gateway URL written into device configs."""
    if config.gateway_url:
        return config.gateway_url.rstrip("/")
    host, port = parse_listen(config.listen_gateway)
    return f"https://{host}:{port}"
