"""The body and token of `POST /register`, parsed and checked; GatewayError says what to fix."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import hdrs
from cryptography import x509
from cryptography.x509.oid import NameOID

from certfleet.pki.authority import device_uuid_of
from certfleet.pki.csr import CsrError, check_csr_signature, check_key, load_csr_pem_or_der
from certfleet.pki.errors import PkiError
from certfleet.pki.pkcs11_signer import parse_hex_id

from .errors import GatewayError, bad_request

REGISTER_SCOPE = "register"
MAX_BODY_BYTES = 1024 * 1024
DEFAULT_BASE_PATH = "/var/sota"
FIELDS = ("csr", "factory", "group", "key_storage", "pkcs11", "base_path")
PKCS11_FIELDS = ("module", "token_label", "key_id", "cert_id")
REALM = 'Bearer realm="certfleet-gateway"'


def unauthorized(code: str, message: str, error: str | None = None) -> GatewayError:
    """A 401 with a Bearer challenge."""
    # RFC 6750 §3: every 401 carries a Bearer challenge; error= when a token was sent.
    challenge = REALM + (f', error="{error}"' if error else "")
    return GatewayError(401, code, message, {hdrs.WWW_AUTHENTICATE: challenge})


def shown(value: object) -> str:
    """A client-supplied value for a message: quoted, escaped and short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def bearer_token(header: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header; 401 otherwise."""
    if not header or not header.strip():
        raise unauthorized(
            "no-token",
            "no Authorization header: send 'Authorization: Bearer <token>' with a token made by "
            "`certfleet tokens create --scope register`",
        )
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise unauthorized(
            "not-bearer",
            "Authorization header is not a Bearer token: send 'Authorization: Bearer <token>'",
            "invalid_request",
        )
    return value.strip()


@dataclass(frozen=True)
class Pkcs11Slots:
    """Where a device keeps its key and certificate in a PKCS#11 token (ids in hex)."""

    module: str
    token_label: str
    key_id: str
    cert_id: str


@dataclass(frozen=True)
class RegistrationRequest:
    """A registration body, checked: a CSR for a device uuid of a factory."""

    csr: x509.CertificateSigningRequest
    device_uuid: str
    factory: str
    group: str | None
    base_path: str
    pkcs11: Pkcs11Slots | None

    @classmethod
    def from_json(cls, body: bytes) -> RegistrationRequest:
        """Parse and check a JSON body; GatewayError (400) names what to fix."""
        data = _json_object(body)
        factory = _text(data, "factory", 64)
        csr = _csr(_text(data, "csr", MAX_BODY_BYTES, printable=False))
        device_uuid = _device_uuid(csr)
        _check_ou(csr, factory)
        return cls(
            csr=csr,
            device_uuid=device_uuid,
            factory=factory,
            group=_text(data, "group", 128, required=False),
            base_path=_path(data, "base_path", required=False) or DEFAULT_BASE_PATH,
            pkcs11=_key_storage(data),
        )


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
        raise bad_request("bad-json", f"body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise bad_request(
            "bad-json", 'body must be a JSON object like {"csr": PEM, "factory": name}'
        )
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise bad_request(
            "unknown-field",
            f"unknown field {shown(unknown[0])} (known: {', '.join(FIELDS)})",
        )
    return data


def _text(
    data: Mapping[str, Any],
    name: str,
    max_length: int,
    *,
    required: bool = True,
    printable: bool = True,
) -> str | None:
    value = data.get(name)
    if value is None:
        if required:
            raise bad_request("missing-field", f"field {name!r} is missing")
        return None
    if not isinstance(value, str) or not value:
        raise bad_request("bad-field", f"field {name!r} must be a non-empty string")
    if len(value) > max_length or (printable and not value.isprintable()):
        raise bad_request(
            "bad-field",
            f"field {name!r} must be at most {max_length} printable characters",
        )
    return value


def _path(data: Mapping[str, Any], name: str, *, required: bool = True) -> str | None:
    value = _text(data, name, 4096, required=required)
    if value is not None and not value.startswith("/"):
        raise bad_request(
            "bad-field", f"field {name!r} must be an absolute path, not {shown(value)}"
        )
    return value


def _csr(text: str) -> x509.CertificateSigningRequest:
    if not text.lstrip().startswith("-----BEGIN"):
        raise bad_request(
            "malformed", "field 'csr' must be a PEM request (-----BEGIN CERTIFICATE REQUEST-----)"
        )
    try:
        csr = load_csr_pem_or_der(text.strip().encode())
        check_csr_signature(csr)
        check_key(csr)
        return csr
    except CsrError as exc:
        raise bad_request(exc.code, str(exc)) from exc


def _device_uuid(csr: x509.CertificateSigningRequest) -> str:
    try:
        value = device_uuid_of(csr)
    except CsrError as exc:
        raise bad_request(exc.code, str(exc)) from exc
    canonical = str(uuid.UUID(value))
    if value != canonical:
        # The gateway finds devices by the CN text: one uuid, one spelling.
        raise bad_request("subject", f"CSR CN {shown(value)} must be written as {canonical}")
    return value


def _check_ou(csr: x509.CertificateSigningRequest, factory: str) -> None:
    units = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    if units and units != [factory]:
        raise bad_request(
            "subject",
            f"CSR OU {shown(', '.join(map(str, units)))} differs from factory {shown(factory)}; "
            "leave OU out or set it to the factory",
        )


def _key_storage(data: Mapping[str, Any]) -> Pkcs11Slots | None:
    storage = data.get("key_storage", "file")
    if storage not in ("file", "pkcs11"):
        raise bad_request("bad-field", "field 'key_storage' must be file or pkcs11")
    slots = data.get("pkcs11")
    if storage == "file":
        if slots is not None:
            raise bad_request("bad-field", "field 'pkcs11' needs key_storage pkcs11")
        return None
    if not isinstance(slots, dict):
        raise bad_request(
            "bad-field",
            "key_storage pkcs11 needs field 'pkcs11': "
            '{"module", "token_label", "key_id", "cert_id"}',
        )
    unknown = sorted(set(slots) - set(PKCS11_FIELDS))
    if unknown:
        known = ", ".join(PKCS11_FIELDS)
        raise bad_request("unknown-field", f"unknown field pkcs11.{unknown[0]} (known: {known})")
    return Pkcs11Slots(
        module=_path(slots, "module") or "",
        token_label=_text(slots, "token_label", 64) or "",
        key_id=_hex_id(slots, "key_id"),
        cert_id=_hex_id(slots, "cert_id"),
    )


def _hex_id(slots: Mapping[str, Any], name: str) -> str:
    text = _text(slots, name, 64) or ""
    try:
        return parse_hex_id(text).hex()
    except PkiError as exc:
        raise bad_request("bad-field", f"pkcs11.{name}: {exc}") from exc
