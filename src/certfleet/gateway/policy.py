"""What the operator decides about the device gateway: request limits and refresh intervals."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GatewayPolicy:
    """Settings of the device gateway; the defaults suit a fleet polling every few minutes."""

    # Larger request bodies get 413; a device config upload is the biggest body.
    max_body_bytes: int = 1024 * 1024
    # Update events per POST /events; a rotation reports about a dozen.
    max_events: int = 100
    # last_seen_at is written at most this often per device, not on every request.
    seen_every_seconds: float = 60.0
    # Deny-list changes made elsewhere are seen within about this long.
    denylist_poll_seconds: float = 0.25
    # Full deny-list reload, for entries polling can miss (see denylist_cache.py).
    denylist_reload_seconds: float = 60.0

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1024:
            raise ValueError("gateway max_body_bytes must be at least 1024")
        if self.max_events < 1:
            raise ValueError("gateway max_events must be at least 1")
        for name in ("seen_every_seconds", "denylist_poll_seconds", "denylist_reload_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"gateway {name} must be positive")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> GatewayPolicy:
        """From the [gateway] table of the server's TOML (field names as keys)."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise ValueError(
                f"unknown gateway setting(s) {', '.join(unknown)} (known: {', '.join(known)})"
            )
        for name, value in settings.items():
            wanted = int if known[name].type == "int" else (int, float)
            # bool is an int in Python; a number setting must not take true/false.
            if not isinstance(value, wanted) or isinstance(value, bool):
                raise ValueError(f"gateway setting {name} = {value!r} has the wrong type")
        return cls(**settings)
