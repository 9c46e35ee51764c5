"""EST renewal for the device agent: `simplereenroll` and `cacerts`, synchronous.

The agent runs once per rotation on small devices, so it uses the standard
library's HTTPS client (`agent.https`) and the EST body framing of `est.wire`
rather than the aiohttp client of `est.client`, whose import alone costs more
CPU than a whole rotation may.

The EST base URL is ESTSERVER as the operator gave it; one without a path
(``https://est.example:8443``) gets ``/.well-known/est`` added, one with a path
(``https://est.example:8443/.well-known/est/acme``) is used as it is.
"""

from __future__ import annotations

import ssl
import urllib.parse
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certfleet.est import wire
from certfleet.pki.errors import PkiError
from certfleet.pki.pkcs7 import load_certs_only

from . import https

WELL_KNOWN = "/.well-known/est"
MAX_RETRY_AFTER_S = 3600


class EstRefused(Exception):
    """The EST server answered with an error, or with something the agent cannot use."""

    def __init__(self, operation: str, status: int, reason: str) -> None:
        super().__init__(f"EST {operation} answered {status}: {reason}")
        self.status = status

    @property
    def retryable(self) -> bool:
        """True for answers worth repeating later (server busy or broken), not refusals."""
        return self.status >= 500 or self.status in (408, 429)


@dataclass(frozen=True)
class EstPending:
    """The server holds the request for an operator (202); repeat it after `retry_after` s."""

    retry_after: int


def est_base(url: str) -> str:
    """The base URL the operations hang off (see the module text)."""
    parts = urllib.parse.urlsplit(url.rstrip("/"))
    if parts.path in ("", "/"):
        return url.rstrip("/") + WELL_KNOWN
    return url.rstrip("/")


class EstServer:
    """One EST server, reached over one kept-alive connection with the device's current cert."""

    def __init__(
        self, url: str, context: ssl.SSLContext, timeout: float = https.DEFAULT_TIMEOUT_S
    ) -> None:
        origin, self._path = https.split_url(est_base(url))
        self._connection = https.Connection(origin, context, timeout)

    def __enter__(self) -> EstServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._connection.close()

    def cacerts(self) -> list[x509.Certificate]:
        """The CA certificates the server issues under (its issuing CA, usually with the root)."""
        answer = self._connection.request("GET", f"{self._path}/cacerts")
        return _certs(answer, "cacerts")

    def simplereenroll(self, csr: x509.CertificateSigningRequest) -> x509.Certificate | EstPending:
        """POST the CSR; the certificate for its key, or EstPending if an operator must approve."""
        body = wire.encode_body(csr.public_bytes(serialization.Encoding.DER))
        answer = self._connection.request(
            "POST", f"{self._path}/simplereenroll", body, {"Content-Type": wire.PKCS10}
        )
        if answer.status == 202:
            return EstPending(_retry_after(answer))
        wanted = csr.public_key()
        for cert in _certs(answer, "simplereenroll"):
            if cert.public_key() == wanted:
                return cert
        raise EstRefused("simplereenroll", 200, "the answer holds no certificate for the key sent")


def _certs(answer: https.Answer, operation: str) -> list[x509.Certificate]:
    if answer.status != 200:
        raise EstRefused(operation, answer.status, answer.reason())
    try:
        return load_certs_only(wire.decode_body(answer.body))
    except (wire.EstWireError, PkiError) as exc:
        raise EstRefused(operation, answer.status, f"unusable answer: {exc}") from None


def _retry_after(answer: https.Answer) -> int:
    try:
        seconds = int(answer.headers.get("retry-after", "60"))
    except ValueError:
        seconds = 60
    return max(1, min(seconds, MAX_RETRY_AFTER_S))
