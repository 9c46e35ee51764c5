"""Turning a device's CSR into a device certificate: the checks and the profile.

Protocol front-ends (EST, gateway registration) decide who may ask; this
module decides what is signed, the same way for all of them.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.x509.oid import NameOID

from . import profiles
from .csr import CsrError, check_csr_signature, check_key
from .signer import Signer


def device_uuid_of(csr: x509.CertificateSigningRequest) -> str:
    """The device id (CN) a CSR asks for; it must be a UUID."""
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise CsrError("subject", "CSR subject needs exactly one CN: the device uuid")
    value = str(names[0].value)
    try:
        uuid.UUID(value)
    except ValueError as exc:
        raise CsrError("subject", f"CSR CN {value!r} is not a device uuid") from exc
    return value


def issue_device_certificate(
    csr: x509.CertificateSigningRequest,
    ca_cert: x509.Certificate,
    ca_signer: Signer,
    factory: str,
    validity: dt.timedelta = profiles.YEAR,
    now: dt.datetime | None = None,
    keep_sans_of: x509.Certificate | None = None,
) -> x509.Certificate:
    """Check a CSR and sign `CN=<uuid>, OU=<factory>` for its key with the device CA.

    On renewal, `keep_sans_of` is the current certificate: its SubjectAltName
    (already checked equal to the CSR's) carries over to the new one.
    """
    check_csr_signature(csr)
    public_key = check_key(csr)
    device_uuid = device_uuid_of(csr)
    builder = profiles.device(
        device_uuid,
        factory,
        public_key,
        profiles.Issuer.of(ca_cert),
        validity,
        now,
        sans=_sans(keep_sans_of),
    )
    return ca_signer.sign_certificate(builder)


def _sans(cert: x509.Certificate | None) -> list[x509.GeneralName] | None:
    if cert is None:
        return None
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return None


@dataclass(frozen=True)
class FactoryAuthority:
    """What a server process needs to trust and issue device certs for one factory."""

    factory: str
    root: x509.Certificate
    issuing_ca: x509.Certificate
    issuing_ca_id: int
    signer: Signer
    device_cas: dict[str, x509.Certificate] = field(default_factory=dict)  # sha256 -> cert

    def chain(self) -> list[x509.Certificate]:
        """Issuing CA then root: what /cacerts returns and devices need to build a chain."""
        return [self.issuing_ca, self.root]
