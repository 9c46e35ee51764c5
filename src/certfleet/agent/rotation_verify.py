"""Checks on a renewed certificate before the device relies on it.

The reference switches to whatever the EST server returned. Here the new
certificate must be for the new key, name the device exactly as the old one
did (subject bytes and SubjectAltName), be valid now, and chain to the factory
root the device already trusts, through the issuing CA the EST server lists in
`cacerts`; that list is only a source of intermediates, the anchor is the
device's own `root.crt`. The chain is checked by `cryptography`'s verifier
with the client-certificate policy (key usage, extended key usage, path
length, dates of every certificate).
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification

from .rotation_context import Fail


def verify_new_certificate(
    cert: x509.Certificate,
    new_key: ec.EllipticCurvePublicKey,
    old_cert: x509.Certificate,
    roots: list[x509.Certificate],
    cas: list[x509.Certificate],
    now: dt.datetime | None = None,
) -> None:
    """Raise Fail naming every problem with `cert`; return if it may replace `old_cert`."""
    now = now or dt.datetime.now(dt.UTC)
    problems = [
        *_key_problems(cert, new_key),
        *_name_problems(cert, old_cert),
        *_date_problems(cert, now),
        *_chain_problems(cert, roots, cas, now),
    ]
    if problems:
        raise Fail(
            "the new certificate was not used: " + "; ".join(problems),
            issued_serial=f"{cert.serial_number:x}",
        )


def _key_problems(cert: x509.Certificate, new_key: ec.EllipticCurvePublicKey) -> list[str]:
    if cert.public_key() != new_key:
        return ["it is not for the key this device just made"]
    return []


def _name_problems(cert: x509.Certificate, old_cert: x509.Certificate) -> list[str]:
    problems = []
    if cert.subject.public_bytes() != old_cert.subject.public_bytes():
        problems.append(
            f"its subject {cert.subject.rfc4514_string()} differs from the current "
            f"{old_cert.subject.rfc4514_string()}"
        )
    if _sans(cert) != _sans(old_cert):
        problems.append("its SubjectAltName differs from the current certificate's")
    return problems


def _sans(cert: x509.Certificate) -> frozenset[x509.GeneralName]:
    try:
        return frozenset(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return frozenset()


def _date_problems(cert: x509.Certificate, now: dt.datetime) -> list[str]:
    if cert.not_valid_before_utc > now:
        return [f"it is valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC"]
    if cert.not_valid_after_utc <= now:
        return [f"it expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"]
    return []


def _chain_problems(
    cert: x509.Certificate,
    roots: list[x509.Certificate],
    cas: list[x509.Certificate],
    now: dt.datetime,
) -> list[str]:
    # A root in the EST answer is no anchor; only intermediates are taken from it.
    intermediates = [ca for ca in cas if ca.issuer != ca.subject]
    # Device certificates name the device in the subject; a SubjectAltName is optional.
    leaf_policy = verification.ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None
    )
    try:
        verifier = (
            verification.PolicyBuilder()
            .store(verification.Store(roots))
            .time(now)
            .extension_policies(
                ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(), ee_policy=leaf_policy
            )
            .build_client_verifier()
        )
        verifier.verify(cert, intermediates)
    except verification.VerificationError as exc:
        return [f"it does not chain to this device's factory root ({exc})"]
    return []
