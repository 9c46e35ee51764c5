"""RFC 7030 EST client, used by the device agent and `certfleet-agent est`.

The server is authenticated against an explicit trust anchor. Without one,
`fetch_cacerts_unverified` does the RFC 7030 §4.1.1 bootstrap: it fetches the
CA certificates over an unauthenticated connection, and the caller must have a
person (or a pinned fingerprint) confirm them before they are used.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from certfleet.pki.pkcs7 import load_certs_only
from certfleet.pki.tls_client import TokenKey, client_context

from . import wire

MAX_RETRY_AFTER = 3600


class EstClientError(Exception):
    """The server refused or answered something we cannot use."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"EST server answered {status}: {message}" if status else message)
        self.status = status


@dataclass(frozen=True)
class Pending:
    """The server holds the request (202); retry the same request after `retry_after` s."""

    retry_after: int


@dataclass(frozen=True)
class ServerKey:
    """A key the server generated (serverkeygen) and the certificate for it."""

    key_pkcs8_der: bytes
    certs: list[x509.Certificate]


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint as colon-separated hex, as `openssl x509 -fingerprint` shows it."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def tls_context(
    trust: list[x509.Certificate] | None,
    cert_file: Path | None = None,
    key_file: Path | TokenKey | None = None,
) -> ssl.SSLContext:
    """Client context: server checked against `trust` (or not at all, for bootstrap).

    `key_file` may be a `TokenKey`: the key then stays in its PKCS#11 token.
    """
    return client_context(trust, cert_file, key_file)


class EstClient:
    """Talks to one EST server (and CA label) as one client identity."""

    def __init__(
        self,
        server: str,
        trust: list[x509.Certificate] | None,
        *,
        label: str | None = None,
        cert_file: Path | None = None,
        key_file: Path | TokenKey | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.base = server.rstrip("/") + "/.well-known/est" + (f"/{label}" if label else "")
        self._ssl = tls_context(trust, cert_file, key_file)
        self._auth = aiohttp.BasicAuth(username, password or "") if username else None
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def _request(
        self, method: str, op: str, body: bytes | None = None, content_type: str | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        headers = {"Content-Type": content_type} if content_type else {}
        connector = aiohttp.TCPConnector(ssl=self._ssl)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=self._timeout) as session,
            session.request(
                method, f"{self.base}/{op}", data=body, headers=headers, auth=self._auth
            ) as response,
        ):
            return response.status, dict(response.headers), await response.read()

    async def cacerts(self) -> list[x509.Certificate]:
        """The CA certificates the server issues under (issuing CA and root)."""
        status, _, body = await self._request("GET", "cacerts")
        _raise_unless_ok(status, body)
        return load_certs_only(wire.decode_body(body))

    async def csrattrs(self) -> list[str]:
        """What the server wants in a CSR, as text (OIDs and attributes)."""
        status, _, body = await self._request("GET", "csrattrs")
        if status == 204:
            return []
        _raise_unless_ok(status, body)
        from .csrattrs import parse_csrattrs  # asn1crypto: loaded only by the one call needing it

        return parse_csrattrs(wire.decode_body(body))

    async def simpleenroll(self, csr: x509.CertificateSigningRequest) -> x509.Certificate | Pending:
        """First certificate for a new device (HTTP Basic or a manufacturer cert)."""
        return await self._enroll("simpleenroll", csr)

    async def simplereenroll(
        self, csr: x509.CertificateSigningRequest
    ) -> x509.Certificate | Pending:
        """Renew: same subject, new key, authenticated with the current certificate."""
        return await self._enroll("simplereenroll", csr)

    async def _enroll(
        self, op: str, csr: x509.CertificateSigningRequest
    ) -> x509.Certificate | Pending:
        der = csr.public_bytes(serialization.Encoding.DER)
        status, headers, body = await self._request("POST", op, wire.encode_body(der), wire.PKCS10)
        if status == 202:
            return _pending(headers)
        _raise_unless_ok(status, body)
        certs = load_certs_only(wire.decode_body(body))
        return _leaf_for(certs, csr)

    async def serverkeygen(self, csr: x509.CertificateSigningRequest) -> ServerKey | Pending:
        """Let the server make the key (only where the server allows it)."""
        der = csr.public_bytes(serialization.Encoding.DER)
        status, headers, body = await self._request(
            "POST", "serverkeygen", wire.encode_body(der), wire.PKCS10
        )
        if status == 202:
            return _pending(headers)
        _raise_unless_ok(status, body)
        key, certs = wire.parse_serverkeygen_multipart(body, headers.get("Content-Type", ""))
        return ServerKey(key, certs)

    async def enroll_waiting(
        self, op: str, csr: x509.CertificateSigningRequest, max_wait: float
    ) -> x509.Certificate:
        """simpleenroll/simplereenroll, retrying the identical request while it is pending."""
        waited = 0.0
        while True:
            result = await self._enroll(op, csr)
            if not isinstance(result, Pending):
                return result
            if waited + result.retry_after > max_wait:
                raise EstClientError(202, f"still pending approval after {waited:.0f} s")
            await asyncio.sleep(result.retry_after)
            waited += result.retry_after


def _pending(headers: dict[str, str]) -> Pending:
    try:
        seconds = int(headers.get("Retry-After", "60"))
    except ValueError:
        seconds = 60
    return Pending(max(1, min(seconds, MAX_RETRY_AFTER)))


def _raise_unless_ok(status: int, body: bytes) -> None:
    if status != 200:
        message = body.decode("utf-8", "replace").strip().splitlines()
        raise EstClientError(status, message[0] if message else "(no reason given)")


def _leaf_for(
    certs: list[x509.Certificate], csr: x509.CertificateSigningRequest
) -> x509.Certificate:
    # A server may add its chain; the answer is the one for our key.
    wanted = csr.public_key().public_numbers()  # type: ignore[union-attr]
    for cert in certs:
        if cert.public_key().public_numbers() == wanted:  # type: ignore[union-attr]
            return cert
    raise EstClientError(0, "the EST server returned no certificate for the key we sent")


async def fetch_cacerts_unverified(server: str, label: str | None = None) -> list[x509.Certificate]:
    """Bootstrap (RFC 7030 §4.1.1): CA certs over an unverified connection; confirm them!"""
    return await EstClient(server, None, label=label).cacerts()
