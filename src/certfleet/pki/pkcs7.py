"""Degenerate ("certs-only") PKCS#7 SignedData: how EST carries certificates.

The certificates sit in a DER SET OF, which is sorted by encoding, so the order
given to `certs_only` is not kept; readers must not rely on it.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from .errors import PkiError


class Pkcs7Error(PkiError):
    """A certs-only PKCS#7 could not be built or read; `code` names the reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def certs_only(certs: list[x509.Certificate]) -> bytes:
    """DER certs-only PKCS#7 holding `certs` (for /cacerts and enroll responses)."""
    if not certs:
        raise Pkcs7Error("no-certs", "no certificates to put in the PKCS#7 response")
    return pkcs7.serialize_certificates(list(certs), serialization.Encoding.DER)


def load_certs_only(der: bytes) -> list[x509.Certificate]:
    """Client side: the certificates of a DER certs-only PKCS#7; at least one."""
    if der.lstrip().startswith(b"-----BEGIN"):
        raise Pkcs7Error(
            "malformed", "PKCS#7 is PEM; expected DER (decode the EST body's base64 first)"
        )
    try:
        certs = pkcs7.load_der_pkcs7_certificates(der)
    except ValueError as exc:
        # cryptography refuses a well-formed SignedData without certificates this way.
        if "no certificate" in str(exc):
            raise Pkcs7Error("no-certs", "the PKCS#7 structure holds no certificates") from exc
        raise Pkcs7Error("malformed", f"not a DER PKCS#7 certs-only structure: {exc}") from exc
    if not certs:
        raise Pkcs7Error("no-certs", "the PKCS#7 structure holds no certificates")
    return certs
