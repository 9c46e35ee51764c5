"""The device's copy of its config as the gateway sent it (values still encrypted).

`<state_dir>/config.json` (mode 0600): `{"last_modified": str | null, "files":
{name: {"Value", "OnChanged", "Unencrypted"}}}`, the body of `GET /config` and
its Last-Modified. The config daemon writes it after each change; a key
rotation re-encrypts it for the new key. Written durably (temp, fsync, rename,
fsync of the directory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from certfleet.pki.files import write_atomic

FILE_NAME = "config.json"


class LocalConfigError(Exception):
    """The local config copy is unreadable; the message names the file."""


@dataclass(frozen=True)
class LocalConfig:
    """Config files as received, and the version (Last-Modified) they are."""

    last_modified: str | None = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)


def config_path(state_dir: Path) -> Path:
    """Where the local copy lives."""
    return state_dir / FILE_NAME


def load_local_config(state_dir: Path) -> LocalConfig:
    """The local copy, or an empty one if the device has none yet."""
    path = config_path(state_dir)
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return LocalConfig()
    except (OSError, ValueError) as exc:
        raise LocalConfigError(f"{path} is unreadable ({exc}); delete it to fetch anew") from None
    if not (isinstance(doc, dict) and isinstance(doc.get("files"), dict)):
        raise LocalConfigError(f"{path} is not a certfleet config copy; delete it to fetch anew")
    return LocalConfig(doc.get("last_modified"), doc["files"])


def save_local_config(state_dir: Path, config: LocalConfig) -> None:
    """Replace the local copy durably."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    doc = {"last_modified": config.last_modified, "files": config.files}
    write_atomic(config_path(state_dir), json.dumps(doc, sort_keys=True).encode(), 0o600)
