"""Certificate objects in a PKCS#11 token, next to the key they are for (ids in hex)."""

from __future__ import annotations

import pkcs11
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pkcs11 import Attribute, ObjectClass
from pkcs11.util.x509 import decode_x509_certificate

from .errors import PkiError
from .pkcs11_signer import Pkcs11Ref, TokenSession, open_token_session, parse_hex_id


def token_has_certificate(module: str, token: str, cert_id: str, pin: str | None) -> bool:
    """True if the token holds a certificate object with id `cert_id` (hex)."""
    session = open_token_session(Pkcs11Ref(module, token), pin)
    with session.lock:
        return bool(_certificates(session.session, parse_hex_id(cert_id)))


def read_token_certificate(
    module: str, token: str, cert_id: str, pin: str | None
) -> x509.Certificate:
    """The certificate with id `cert_id` (hex) in the token."""
    session = open_token_session(Pkcs11Ref(module, token), pin)
    with session.lock:
        found = _certificates(session.session, parse_hex_id(cert_id))
        if not found:
            raise PkiError(f"token {token!r} has no certificate with id {cert_id}")
        der = found[0][Attribute.VALUE]
    return x509.load_der_x509_certificate(der)


def store_token_certificate(
    module: str, token: str, cert_id: str, pin: str | None, cert: x509.Certificate
) -> None:
    """Put `cert` in the token under id `cert_id`, replacing a certificate already there."""
    session = open_token_session(Pkcs11Ref(module, token), pin)
    replace_certificate(session, parse_hex_id(cert_id), cert)


def replace_certificate(session: TokenSession, raw_id: bytes, cert: x509.Certificate) -> None:
    """Create `cert` under `raw_id` in an open session, then destroy the ones there before.

    Created first: a failure or crash in between leaves the old certificate (or
    both, and the reader picks the one for its key), never none.
    """
    template = decode_x509_certificate(cert.public_bytes(serialization.Encoding.DER))
    template.update(
        {
            Attribute.TOKEN: True,
            Attribute.ID: raw_id,
            Attribute.LABEL: f"certfleet-cert-{raw_id.hex()}",
        }
    )
    with session.lock:
        old = _certificates(session.session, raw_id)
        session.session.create_object(template)
        for obj in old:
            obj.destroy()


def _certificates(session: pkcs11.Session, raw_id: bytes) -> list[pkcs11.Object]:
    query = {Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.ID: raw_id}
    return list(session.get_objects(query))
