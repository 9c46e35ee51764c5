"""Certificate revocation lists signed by a CA."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from cryptography import x509

from .signer import Signer

CRL_VALIDITY = dt.timedelta(days=30)


def build_crl(
    issuer: x509.Certificate,
    signer: Signer,
    revoked: Iterable[tuple[int, dt.datetime]],
    number: int,
    now: dt.datetime | None = None,
) -> x509.CertificateRevocationList:
    """A CRL from `issuer` listing `(serial, revocation time)` pairs."""
    now = now or dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(now)
        .next_update(now + CRL_VALIDITY)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key),
            critical=False,
        )
    )
    for serial, when in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when)
        builder = builder.add_revoked_certificate(entry.build())
    return signer.sign_crl(builder)
