"""Webhook sink: POST each envelope as JSON, signed with HMAC-SHA256.

Headers: ``X-Certfleet-Signature: sha256=<hex HMAC of the raw body>``,
``X-Certfleet-Event-Id: <id>`` and ``X-Certfleet-Topic``. Any 2xx answer
means delivered; redirects are not followed, so a signed body never goes to
an address the operator did not configure.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlsplit

import aiohttp

from certfleet.events.names import Envelope
from certfleet.events.sink import DeliveryError

SIGNATURE_HEADER = "X-Certfleet-Signature"
EVENT_ID_HEADER = "X-Certfleet-Event-Id"
TOPIC_HEADER = "X-Certfleet-Topic"
SCHEME = "sha256="


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def sign(secret: str | bytes, body: bytes) -> str:
    """The signature header value for ``body``."""
    return SCHEME + hmac.new(_key(secret), body, hashlib.sha256).hexdigest()


def verify_signature(secret: str | bytes, body: bytes, header: str | None) -> bool:
    """True if ``header`` is the signature of ``body`` under ``secret`` (constant time)."""
    if not header or not header.startswith(SCHEME):
        return False
    return hmac.compare_digest(sign(secret, body).encode(), header.strip().encode())


def display_url(url: str) -> str:
    """``url`` without credentials or query, for logs: either may hold a token."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class WebhookSink:
    """POSTs envelopes to one URL."""

    def __init__(self, url: str, secret: str | bytes, *, timeout: float = 10.0) -> None:
        self.url = url
        self.name = f"webhook {display_url(url)}"
        self._secret = _key(secret)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"WebhookSink({display_url(self.url)!r})"

    async def send(self, envelope: Envelope) -> None:
        """POST the envelope; raise DeliveryError unless the answer is 2xx."""
        body = envelope.body()
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self._secret, body),
            EVENT_ID_HEADER: envelope.id,
            TOPIC_HEADER: envelope.topic,
        }
        try:
            async with self._client().post(
                self.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                if not 200 <= response.status < 300:
                    raise DeliveryError(f"HTTP {response.status}")
        except TimeoutError:
            raise DeliveryError("timed out") from None
        except aiohttp.ClientError as exc:
            raise DeliveryError(_describe(exc)) from None

    async def close(self) -> None:
        """Close the HTTP connection pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use: a ClientSession belongs to the running event loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session


def _describe(exc: aiohttp.ClientError) -> str:
    # aiohttp's texts may quote the full URL; name the failure, not the address.
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or type(exc.os_error).__name__}"
    return type(exc).__name__
