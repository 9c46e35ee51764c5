"""What the operator decides about EST: validity, renewal rules, approval, limits, proxies."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from certfleet.pki.profiles import YEAR

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class EstPolicy:
    """Settings of the EST server; the defaults suit a fleet that renews over mTLS."""

    # The device profile clamps this to the issuing CA's own expiry.
    validity: dt.timedelta = YEAR
    allow_same_key: bool = False
    require_tls_unique: bool = False
    manual_approval: bool = False
    retry_after: int = 60
    # Off by default: a key made on the server has been outside the device.
    serverkeygen_enabled: bool = False
    max_body_bytes: int = 64 * 1024
    # Addresses (or networks) of TLS-terminating proxies allowed to pass the client cert.
    trusted_proxies: list[str] = field(default_factory=list)
    # nginx: proxy_set_header X-SSL-Client-Cert $ssl_client_escaped_cert;
    client_cert_header: str = "X-SSL-Client-Cert"
    # Factory served at /.well-known/est/<op>; None means the only factory.
    default_label: str | None = None

    def __post_init__(self) -> None:
        if self.validity <= dt.timedelta(0):
            raise ValueError("EST validity must be positive")
        if self.retry_after < 1:
            raise ValueError("EST retry_after must be at least 1 second")
        if self.max_body_bytes < 1024:
            raise ValueError("EST max_body_bytes must be at least 1024")
        _ = self.proxy_networks  # refuse a bad address now, not at the first request

    @functools.cached_property
    def proxy_networks(self) -> tuple[IpNetwork, ...]:
        """trusted_proxies parsed; a single address is a /32 or /128 network."""
        try:
            return tuple(ipaddress.ip_network(a, strict=False) for a in self.trusted_proxies)
        except ValueError as exc:
            raise ValueError(f"EST trusted_proxies: {exc}") from exc

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> EstPolicy:
        """From the [est] table of the server's TOML: field names, validity as validity_days."""
        values = dict(settings)
        if "validity_days" in values:
            values["validity"] = dt.timedelta(
                days=_typed("validity_days", values.pop("validity_days"), int)
            )
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            names = ", ".join(sorted({*known, "validity_days"} - {"validity"}))
            raise ValueError(f"unknown EST setting(s) {', '.join(unknown)} (known: {names})")
        for name, value in values.items():
            if name != "validity":
                _typed(name, value, _SETTING_TYPES[name])
        return cls(**values)

    def is_trusted_proxy(self, address: str | None) -> bool:
        """True if ``address`` is one of the configured proxies."""
        if not address or not self.trusted_proxies:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.proxy_networks)


_SETTING_TYPES: dict[str, type | tuple[type, ...]] = {
    "allow_same_key": bool,
    "require_tls_unique": bool,
    "manual_approval": bool,
    "retry_after": int,
    "serverkeygen_enabled": bool,
    "max_body_bytes": int,
    "trusted_proxies": list,
    "client_cert_header": str,
    "default_label": (str, type(None)),
}


def _typed(name: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    # bool is an int in Python; a setting that wants a number must not take true/false.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"EST setting {name} = {value!r} has the wrong type")
    return value
