"""What a registered device gets back: its certificate, the roots and its `sota.toml`."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .registration_request import Pkcs11Slots

# The device's files, relative to base_path in sota.toml (as aktualizr reads [import]).
ROOT_FILE = "root.crt"
CLIENT_CERT_FILE = "client.pem"
CLIENT_KEY_FILE = "pkey.pem"


@dataclass(frozen=True)
class Registration:
    """What a registered device gets back."""

    uuid: str
    client_pem: str
    root_pem: str
    ca_pem: str
    sota_toml: str

    def as_dict(self) -> dict[str, str]:
        """The JSON answer."""
        return {
            "uuid": self.uuid,
            "client_pem": self.client_pem,
            "root_pem": self.root_pem,
            "ca_pem": self.ca_pem,
            "sota_toml": self.sota_toml,
        }


def sota_toml(gateway_url: str, base_path: str, pkcs11: Pkcs11Slots | None) -> str:
    """The device's aktualizr-style config: the gateway, and where its key and certs are."""
    source = "pkcs11" if pkcs11 else "file"
    lines = [
        "# Device configuration written at registration by certfleet.",
        "[tls]",
        f"server = {_toml(gateway_url)}",
        'ca_source = "file"',
        f"pkey_source = {_toml(source)}",
        f"cert_source = {_toml(source)}",
        "",
        "[import]",
        f"base_path = {_toml(base_path)}",
        f"tls_cacert_path = {_toml(ROOT_FILE)}",
    ]
    if pkcs11 is None:
        lines += [
            f"tls_pkey_path = {_toml(CLIENT_KEY_FILE)}",
            f"tls_clientcert_path = {_toml(CLIENT_CERT_FILE)}",
        ]
    else:
        lines += [
            "",
            "[p11]",
            f"module = {_toml(pkcs11.module)}",
            f"label = {_toml(pkcs11.token_label)}",
            f"tls_pkey_id = {_toml(pkcs11.key_id)}",
            f"tls_clientcert_id = {_toml(pkcs11.cert_id)}",
            "# The token PIN (pass = ...) never reaches the server; add it on the device.",
        ]
    return "\n".join(lines) + "\n"


def _toml(value: str) -> str:
    # Values are checked printable before they get here; only \ and " need escaping.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def pem_text(cert: x509.Certificate) -> str:
    """The certificate as PEM text, as the JSON answer carries it."""
    return cert.public_bytes(serialization.Encoding.PEM).decode()


# -- the decisions --------------------------------------------------------------------------
