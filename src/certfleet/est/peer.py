"""Who sent an EST request: TLS client certificate, tls-unique, TLS version and address.

Both TLS stacks are read: the stdlib one through asyncio's `ssl_object`, the
pyOpenSSL transport of `certfleet.tls` through its `peercert_x509`,
`tls_unique` and `tls_version` extras. Behind a TLS-terminating proxy the
client certificate comes from a header, trusted only from the configured proxy
addresses and checked here because no TLS layer of ours verified it.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from certfleet.pki.authority import FactoryAuthority
from certfleet.pki.csr import name_text

from .errors import bad_request, forbidden
from .policy import EstPolicy
from .service import check_cert_dates

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerInfo:
    """What the connection (or a trusted proxy) proved about the client."""

    client_cert: x509.Certificate | None
    tls_unique: bytes | None
    tls_version: str | None
    address: str
    via_proxy: bool = False


PeerGetter = Callable[[web.BaseRequest], PeerInfo]


class PeerReader:
    """A PeerGetter for `make_est_app` that honours the policy's trusted proxies."""

    def __init__(self, policy: EstPolicy, authorities: Mapping[str, FactoryAuthority]) -> None:
        self.policy = policy
        self.device_cas = [ca for a in authorities.values() for ca in a.device_cas.values()]

    def __call__(self, request: web.BaseRequest) -> PeerInfo:
        address = request.remote or "-"
        header = request.headers.get(self.policy.client_cert_header)
        if self.policy.is_trusted_proxy(address):
            return PeerInfo(self._header_cert(header), None, None, address, via_proxy=True)
        if header is not None:
            log.info(
                "ignoring %s header from %s: not a trusted proxy",
                self.policy.client_cert_header,
                address,
            )
        return tls_peer(request.transport, address)

    def _header_cert(self, value: str | None) -> x509.Certificate | None:
        # nginx sends an empty value when the client showed no certificate.
        if value is None or not value.strip():
            return None
        name = self.policy.client_cert_header
        try:
            cert = x509.load_pem_x509_certificate(urllib.parse.unquote(value).encode())
        except ValueError as exc:
            raise bad_request(
                "bad-cert-header", f"{name} header is not a URL-escaped PEM certificate"
            ) from exc
        if not any(_issued_by(cert, ca) for ca in self.device_cas):
            raise forbidden(
                "untrusted-cert",
                f"client certificate from the {name} header (issuer {name_text(cert.issuer)}) "
                "was not issued by a trusted device CA",
            )
        check_cert_dates(cert)
        return cert


def tls_peer(transport: asyncio.BaseTransport | None, address: str) -> PeerInfo:
    """PeerInfo from the connection itself, on either TLS stack (or none)."""
    if transport is None:
        return PeerInfo(None, None, None, address)
    sslobj = transport.get_extra_info("ssl_object")
    if sslobj is None:
        return PeerInfo(
            transport.get_extra_info("peercert_x509"),
            transport.get_extra_info("tls_unique"),
            transport.get_extra_info("tls_version"),
            address,
        )
    der = sslobj.getpeercert(binary_form=True)
    version = sslobj.version()
    # tls-unique is defined for TLS 1.2 only (RFC 9266 replaces it in 1.3).
    unique = sslobj.get_channel_binding("tls-unique") if version == "TLSv1.2" else None
    cert = x509.load_der_x509_certificate(der) if der else None
    return PeerInfo(cert, unique, version, address)


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    if cert.issuer != ca.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
