"""The [api] table of the server's TOML: how the admin API listener behaves."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .app import DEFAULT_MAX_BODY_BYTES


@dataclass(frozen=True)
class ApiSettings:
    """Settings of the admin API listener."""

    # Plain HTTP is allowed only on a loopback address (see check_listen).
    tls: bool = True
    # Larger request bodies get 413.
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1024:
            raise ValueError("api max_body_bytes must be at least 1024")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> ApiSettings:
        """From the [api] table (field names as keys)."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise ValueError(
                f"unknown api setting(s) {', '.join(unknown)} (known: {', '.join(known)})"
            )
        for name, value in settings.items():
            wanted = bool if known[name].type == "bool" else int
            if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
                raise ValueError(f"api setting {name} = {value!r} has the wrong type")
        return cls(**settings)

    def check_listen(self, host: str) -> None:
        """Refuse plain HTTP anywhere but loopback: tokens would cross the network in clear."""
        if self.tls or is_loopback(host):
            return
        raise ValueError(
            f"the admin API serves plain HTTP only on a loopback address, not {host}; "
            "set tls = true in [api] (the default) or listen on 127.0.0.1"
        )


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
