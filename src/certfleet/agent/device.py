"""The device's identity as `sota.toml` describes it: gateway, root, key and certificate.

`sota.toml` (written at registration, rewritten at the end of a rotation) is the
one place that says which key and certificate the device uses now: two files
under `[import] base_path`, or two object ids in a PKCS#11 token (`[p11]`).
"""

from __future__ import annotations

import ssl
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from certfleet.pki.signer import Signer, load_file_signer

CONFIG_FILE = "sota.toml"


class DeviceConfigError(Exception):
    """sota.toml is missing or does not say what the agent needs."""


@dataclass(frozen=True)
class TokenSlots:
    """Where the device key and certificate live in a PKCS#11 token (ids in hex)."""

    module: str
    label: str
    key_id: str
    cert_id: str
    pin: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Device:
    """What `sota.toml` says, with paths resolved against `base_path`."""

    config_path: Path
    gateway_url: str
    base_path: Path
    root_path: Path
    key_path: Path | None
    cert_path: Path | None
    token: TokenSlots | None

    @property
    def uses_token(self) -> bool:
        """True if the key and certificate are in a PKCS#11 token."""
        return self.token is not None

    def signer(self) -> Signer:
        """The current device key, wherever it lives."""
        if self.token is not None:
            # Imported here: loading the PKCS#11 stack costs file-key devices ~0.1 s of CPU.
            from certfleet.pki.pkcs11_signer import Pkcs11Ref, Pkcs11Signer, parse_hex_id

            ref = Pkcs11Ref(
                self.token.module, self.token.label, key_id=parse_hex_id(self.token.key_id)
            )
            return Pkcs11Signer(ref, self.token.pin)
        assert self.key_path is not None
        return load_file_signer(self.key_path)

    def certificate(self) -> x509.Certificate:
        """The current client certificate."""
        if self.token is not None:
            from certfleet.pki.token_certificates import read_token_certificate

            return read_token_certificate(
                self.token.module, self.token.label, self.token.cert_id, self.token.pin
            )
        assert self.cert_path is not None
        return x509.load_pem_x509_certificate(self.cert_path.read_bytes())

    def tls_context(self) -> ssl.SSLContext:
        """Client context: the gateway checked against the factory root, our cert presented."""
        if self.token is not None:
            # Token keys need OpenSSL's PKCS#11 support; see tls_client.
            from certfleet.pki.tls_client import token_client_context

            return token_client_context(self.roots(), self.certificate(), self.token)
        context = ssl.create_default_context(cadata=self.root_path.read_text())
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        assert self.cert_path is not None and self.key_path is not None
        context.load_cert_chain(self.cert_path, self.key_path)
        return context

    def credential_stamp(self) -> tuple[Any, ...]:
        """Changes whenever the files or slots behind `tls_context` change."""
        stamps = []
        for path in (self.root_path, self.cert_path, self.key_path):
            if path is not None:
                st = path.stat()
                stamps.append((path, st.st_ino, st.st_mtime_ns, st.st_size))
        return (*stamps, self.token)

    def roots(self) -> list[x509.Certificate]:
        """The factory root(s) the gateway and EST server are checked against."""
        return x509.load_pem_x509_certificates(self.root_path.read_bytes())


class ContextCache:
    """The device's TLS context, made again only when its credential changes.

    Polls then share one context, so that each connection can resume the last
    one's TLS session (see agent/https.py).
    """

    def __init__(self) -> None:
        self._stamp: tuple[Any, ...] | None = None
        self._context: ssl.SSLContext | None = None

    def context(self, device: Device) -> ssl.SSLContext:
        """The context for `device`'s current credential."""
        stamp = device.credential_stamp()
        if self._context is None or stamp != self._stamp:
            self._context, self._stamp = device.tls_context(), stamp
        return self._context


def load_device(config_path: Path, pin: str | None = None) -> Device:
    """Read `sota.toml`; `pin` is the token PIN (never in the file the server wrote)."""
    try:
        doc = tomllib.loads(config_path.read_text())
    except FileNotFoundError:
        raise DeviceConfigError(
            f"{config_path} does not exist: register the device first (certfleet-agent register)"
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DeviceConfigError(f"{config_path} is not valid TOML ({exc})") from None
    tls, imports = _table(doc, "tls", config_path), _table(doc, "import", config_path)
    base = Path(_text(imports, "base_path", config_path))
    if not base.is_absolute():
        base = config_path.parent / base
    token = None
    if _text(tls, "pkey_source", config_path, "file") == "pkcs11":
        p11 = _table(doc, "p11", config_path)
        token = TokenSlots(
            module=_text(p11, "module", config_path),
            label=_text(p11, "label", config_path),
            key_id=_text(p11, "tls_pkey_id", config_path),
            cert_id=_text(p11, "tls_clientcert_id", config_path),
            pin=pin if pin is not None else p11.get("pass"),
        )
    return Device(
        config_path=config_path,
        gateway_url=_text(tls, "server", config_path).rstrip("/"),
        base_path=base,
        root_path=base / _text(imports, "tls_cacert_path", config_path),
        key_path=None if token else base / _text(imports, "tls_pkey_path", config_path),
        cert_path=None if token else base / _text(imports, "tls_clientcert_path", config_path),
        token=token,
    )


def _table(doc: dict[str, Any], name: str, where: Path) -> dict[str, Any]:
    value = doc.get(name)
    if not isinstance(value, dict):
        raise DeviceConfigError(f"{where} has no [{name}] table")
    return value


def _text(table: dict[str, Any], name: str, where: Path, default: str | None = None) -> str:
    value = table.get(name, default)
    if not isinstance(value, str) or not value:
        raise DeviceConfigError(f"{where}: {name} must be a non-empty string")
    return value
