"""What the config daemon wrote and still owes, kept across restarts and crashes.

`<state_dir>/config-daemon.json` (mode 0600): `{"files": [absolute paths],
"pending": [config file names], "reported": version or null}`.

- `files`: the secrets files the agent wrote. Only these are ever deleted, so a
  file someone else put in the secrets folder survives.
- `pending`: changed files whose OnChanged handlers have not run yet. Written
  before the files themselves, so that a crash leaves a superset: at worst a
  handler runs twice, never not at all.
- `reported`: the last config version the gateway was told was applied, so a
  report lost to a network failure or a stop is sent on a later cycle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from certfleet.pki.files import write_atomic

FILE_NAME = "config-daemon.json"


class ManifestError(Exception):
    """The manifest is unreadable; the message names the file and what to do."""


@dataclass
class Manifest:
    """The files the agent wrote, the handlers it still owes, the version it reported."""

    path: Path
    files: set[str] = field(default_factory=set)
    pending: set[str] = field(default_factory=set)
    reported: str | None = None

    def save(self) -> None:
        """Write the manifest durably."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        doc = {
            "files": sorted(self.files),
            "pending": sorted(self.pending),
            "reported": self.reported,
        }
        write_atomic(self.path, json.dumps(doc, indent=1).encode() + b"\n", 0o600)


def load_manifest(state_dir: Path) -> Manifest:
    """The manifest in `state_dir`, or an empty one if the agent has written nothing yet."""
    path = state_dir / FILE_NAME
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return Manifest(path)
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path} is unreadable ({exc}); {_advice()}") from None
    if not (
        isinstance(doc, dict)
        and _strings(doc.get("files"))
        and _strings(doc.get("pending"))
        and isinstance(doc.get("reported"), str | None)
    ):
        raise ManifestError(f"{path} is not a certfleet config daemon state; {_advice()}")
    return Manifest(path, set(doc["files"]), set(doc["pending"]), doc["reported"])


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _advice() -> str:
    return (
        "delete it and config.json beside it: the agent then fetches and writes every file "
        "again, but can no longer delete files it wrote before"
    )
