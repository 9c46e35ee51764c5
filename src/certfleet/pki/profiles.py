"""Certificate profiles of the factory PKI (see docs/pki.md for the table)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import PkiError

YEAR = dt.timedelta(days=365)
# Devices with slightly wrong clocks must still accept a fresh certificate.
BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class Issuer:
    """What a profile needs to know of the signing CA."""

    subject: x509.Name
    public_key: ec.EllipticCurvePublicKey
    not_after: dt.datetime | None = None

    @classmethod
    def of(cls, cert: x509.Certificate) -> Issuer:
        """The issuer described by an existing CA certificate."""
        return cls(cert.subject, cert.public_key(), cert.not_valid_after_utc)  # type: ignore[arg-type]


def name(common_name: str, factory: str) -> x509.Name:
    """Subject `CN=<common_name>, OU=<factory>` as the reference uses it."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, factory),
        ]
    )


def _base(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer: Issuer | None,
    validity: dt.timedelta,
    now: dt.datetime | None,
) -> x509.CertificateBuilder:
    now = now or dt.datetime.now(dt.UTC)
    not_after = now + validity
    if issuer and issuer.not_after:
        # A certificate must never outlive the CA that vouches for it.
        not_after = min(not_after, issuer.not_after)
    if not_after <= now:
        raise PkiError("the issuing CA has expired: renew it before issuing certificates")
    issuer_name = issuer.subject if issuer else subject
    issuer_key = issuer.public_key if issuer else public_key
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key), critical=False
        )
    )


def _key_usage(*, signature: bool = False, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def root_ca(
    factory: str, public_key: ec.EllipticCurvePublicKey, now: dt.datetime | None = None
) -> x509.CertificateBuilder:
    """Self-signed root of trust `CN=Factory-CA, OU=<factory>`, 20 years."""
    return (
        _base(name("Factory-CA", factory), public_key, None, 20 * YEAR, now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
    )


def device_ca(
    common_name: str,
    factory: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: Issuer,
    now: dt.datetime | None = None,
) -> x509.CertificateBuilder:
    """Online or offline device CA: signs device certificates only (pathlen 0), 10 years."""
    return (
        _base(name(common_name, factory), public_key, issuer, 10 * YEAR, now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
    )


def server_tls(
    common_name: str,
    factory: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: Issuer,
    dns_names: list[str],
    ip_addresses: list[str],
    now: dt.datetime | None = None,
) -> x509.CertificateBuilder:
    """TLS server certificate for the gateway or the EST server, 10 years."""
    if not dns_names and not ip_addresses:
        raise PkiError(f"{common_name}: give at least one DNS name or IP address")
    san: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    for ip in ip_addresses:
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError as exc:
            raise PkiError(f"{ip!r} is not an IP address") from exc
    return (
        _base(name(common_name, factory), public_key, issuer, 10 * YEAR, now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
    )


def device(
    device_uuid: str,
    factory: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: Issuer,
    validity: dt.timedelta = YEAR,
    now: dt.datetime | None = None,
    sans: list[x509.GeneralName] | None = None,
) -> x509.CertificateBuilder:
    """Device client certificate `CN=<uuid>, OU=<factory>`, clientAuth only."""
    builder = (
        _base(name(device_uuid, factory), public_key, issuer, validity, now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder
