"""The agent's own settings (`agent.toml`), with defaults for a typical device.

Everything the server decides (gateway URL, key and certificate location) is in
`sota.toml`; this file holds what the device's owner decides: where state and
secrets go, which handlers may run, what to restart after a rotation, and when
to renew by itself.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PATH = Path("/etc/certfleet/agent.toml")


class SettingsError(Exception):
    """agent.toml is unreadable or has a bad value; the message names it."""


@dataclass(frozen=True)
class Renewal:
    """Device-initiated renewal: when a share of the certificate's lifetime has passed."""

    enabled: bool = True
    after_share: float = 2 / 3
    jitter_share: float = 0.05
    est_server: str | None = None


@dataclass(frozen=True)
class AgentSettings:
    """Where the agent keeps things and how it behaves."""

    sota_config: Path = Path("/var/sota/sota.toml")
    state_dir: Path = Path("/var/lib/certfleet-agent")
    secrets_dir: Path = Path("/run/secrets")
    handlers_dir: Path = Path("/usr/share/certfleet-agent/handlers")
    poll_interval: float = 300.0
    poll_jitter_share: float = 0.1
    restart_commands: tuple[tuple[str, ...], ...] = ()
    hsm_pin_file: Path | None = None
    renewal: Renewal = field(default_factory=Renewal)

    def hsm_pin(self) -> str | None:
        """The token PIN from `hsm_pin_file` (first line), if one is configured."""
        if self.hsm_pin_file is None:
            return None
        try:
            return self.hsm_pin_file.read_text().splitlines()[0].strip()
        except (OSError, IndexError) as exc:
            raise SettingsError(
                f"hsm_pin_file {self.hsm_pin_file}: cannot read a PIN ({exc})"
            ) from None


def load_settings(path: Path | None) -> AgentSettings:
    """Read `path` (or DEFAULT_PATH if it exists); missing keys take the defaults."""
    if path is None:
        if not DEFAULT_PATH.exists():
            return AgentSettings()
        path = DEFAULT_PATH
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise SettingsError(f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path} is not valid TOML ({exc})") from None
    return parse_settings(doc, str(path))


def parse_settings(doc: dict[str, Any], where: str = "agent.toml") -> AgentSettings:
    """Settings from a parsed TOML document; unknown keys are refused (typos must not pass)."""
    _only(doc, set(AgentSettings.__dataclass_fields__), where)
    base = AgentSettings()
    renewal = _renewal(doc.get("renewal", {}), f"{where} [renewal]")
    return AgentSettings(
        sota_config=_path(doc, "sota_config", base.sota_config, where),
        state_dir=_path(doc, "state_dir", base.state_dir, where),
        secrets_dir=_path(doc, "secrets_dir", base.secrets_dir, where),
        handlers_dir=_path(doc, "handlers_dir", base.handlers_dir, where),
        poll_interval=_number(doc, "poll_interval", base.poll_interval, where, 1, 86400),
        poll_jitter_share=_number(doc, "poll_jitter_share", base.poll_jitter_share, where, 0, 1),
        restart_commands=_commands(doc.get("restart_commands", []), where),
        hsm_pin_file=_path(doc, "hsm_pin_file", None, where),
        renewal=renewal,
    )


def _renewal(doc: Any, where: str) -> Renewal:
    if not isinstance(doc, dict):
        raise SettingsError(f"{where} must be a table")
    _only(doc, set(Renewal.__dataclass_fields__), where)
    base = Renewal()
    enabled = doc.get("enabled", base.enabled)
    if not isinstance(enabled, bool):
        raise SettingsError(f"{where} enabled must be true or false")
    server = doc.get("est_server")
    if server is not None and not (isinstance(server, str) and server.startswith("https://")):
        raise SettingsError(f"{where} est_server must be an https:// URL")
    return Renewal(
        enabled=enabled,
        after_share=_number(doc, "after_share", base.after_share, where, 0.05, 0.95),
        jitter_share=_number(doc, "jitter_share", base.jitter_share, where, 0, 0.5),
        est_server=server,
    )


def _only(doc: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(doc) - allowed)
    if unknown:
        known = ", ".join(sorted(allowed))
        raise SettingsError(f"{where}: unknown setting {unknown[0]!r} (known: {known})")


def _path(doc: dict[str, Any], name: str, default: Path | None, where: str) -> Any:
    value = doc.get(name)
    if value is None:
        return default
    if not isinstance(value, str) or not value.startswith("/"):
        raise SettingsError(f"{where}: {name} must be an absolute path")
    return Path(value)


def _number(
    doc: dict[str, Any], name: str, default: float, where: str, low: float, high: float
) -> float:
    value = doc.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise SettingsError(f"{where}: {name} must be a number from {low} to {high}")
    return float(value)


def _commands(value: Any, where: str) -> tuple[tuple[str, ...], ...]:
    ok = isinstance(value, list) and all(
        isinstance(cmd, list) and cmd and all(isinstance(arg, str) and arg for arg in cmd)
        for cmd in value
    )
    if not ok:
        raise SettingsError(
            f"{where}: restart_commands must be a list of argument lists, "
            '[["systemctl", "restart", "aktualizr-lite"]] for example'
        )
    return tuple(tuple(cmd) for cmd in value)
