"""HTTPS requests over the standard library, for the device agent.

The agent makes a handful of requests per hour; `http.client` costs a tenth of
aiohttp's import time and memory, which matters on a small device. `request`
sends one request on its own connection; `Connection` keeps one connection to
one server open for several requests (a rotation makes about ten, and each new
TLS handshake costs the device more CPU than the request itself).

A new connection resumes the TLS session of the last one made with the same
`ssl.SSLContext` to the same server (a session ticket), so a device that polls
every few minutes with one context pays a full handshake only when the
server's ticket key changes. A session belongs to its context, and the
context to one certificate and key: after a key change the agent makes a new
context, and nothing resumes the old identity.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.parse
import weakref
from dataclasses import dataclass
from typing import Any

DEFAULT_TIMEOUT_S = 30.0
MAX_ANSWER_BYTES = 16 * 1024 * 1024
READ_CHUNK = 64 * 1024
# A kept-alive connection the server closed while idle fails like this; one fresh try is safe.
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)
# The last TLS session per context and (host, port); gone with the context.
_SESSIONS: weakref.WeakKeyDictionary[ssl.SSLContext, dict[tuple[str, int], ssl.SSLSession]] = (
    weakref.WeakKeyDictionary()
)


class Unreachable(Exception):
    """No HTTP answer at all (DNS, connection, TLS, timeout): worth retrying later."""


@dataclass(frozen=True)
class Answer:
    """Status, headers (lower-case names) and body of one HTTP answer."""

    status: int
    headers: dict[str, str]
    body: bytes
    # Whether the connection resumed a TLS session (None: not known).
    resumed: bool | None = None

    def json(self) -> Any:
        """The body as JSON (raises ValueError if it is not)."""
        return json.loads(self.body)

    def reason(self) -> str:
        """The server's own words for a refusal: X-Certfleet-Error code and first body line."""
        text = self.body.decode("utf-8", "replace").strip()
        try:
            doc = json.loads(text)
            if isinstance(doc, dict) and isinstance(doc.get("error"), str):
                text = doc["error"]
        except ValueError:
            pass
        first = text.splitlines()[0] if text else "(no reason given)"
        code = self.headers.get("x-certfleet-error")
        return f"{first} ({code})" if code else first


def request(
    url: str,
    context: ssl.SSLContext,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Answer:
    """Send one request on a new connection and read the whole answer."""
    origin, path = split_url(url)
    connection = Connection(origin, context, timeout)
    try:
        return connection.request(method, path, body, headers)
    finally:
        connection.close()


def split_url(url: str) -> tuple[str, str]:
    """(https://host:port, /path?query) of an https URL; ValueError for anything else."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"not an https URL: {url!r}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return f"https://{parts.netloc}", path


class Connection:
    """Requests to one server over one kept-alive TLS connection, opened when first needed."""

    def __init__(
        self, origin: str, context: ssl.SSLContext, timeout: float = DEFAULT_TIMEOUT_S
    ) -> None:
        parts = urllib.parse.urlsplit(origin)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"not an https URL: {origin!r}")
        self.origin = origin.rstrip("/")
        self._host, self._port = parts.hostname, parts.port or 443
        self._context = context
        self._timeout = timeout
        self._conn: _ResumingConnection | None = None
        self._used = False

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """Send one request and read the whole answer; Unreachable if there is none."""
        url = self.origin + path
        try:
            try:
                return self._exchange(method, path, body, headers)
            except _STALE:
                if not self._used:
                    raise
                self.close()  # the server closed the idle connection; try once on a new one
                return self._exchange(method, path, body, headers)
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise Unreachable(f"{method} {url}: {_describe(exc)}") from exc

    def _exchange(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str] | None
    ) -> Answer:
        if self._conn is None:
            self._conn = _ResumingConnection(
                self._host, self._port, context=self._context, timeout=self._timeout
            )
            self._used = False
        self._conn.request(method, path, body=body, headers=headers or {})
        self._used = True
        response = self._conn.getresponse()
        data = _read_bounded(response)
        found = {name.lower(): value for name, value in response.getheaders()}
        resumed = self._conn.keep_session()
        if response.will_close:
            self.close()
        return Answer(response.status, found, data, resumed)

    def close(self) -> None:
        """Close the connection (the next request opens a new one)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class _ResumingConnection(http.client.HTTPSConnection):
    """An HTTPS connection that offers the last session made with its context."""

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)  # TCP only: the TLS part is ours
        known = _SESSIONS.get(self._context, {}).get((self.host, self.port))
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host, session=known)

    def keep_session(self) -> bool | None:
        """Remember this connection's session for the next one; whether it was resumed.

        Called after an answer was read: a TLS 1.3 ticket comes after the handshake.
        """
        sock = self.sock
        if not isinstance(sock, ssl.SSLSocket):
            return None
        if sock.session is not None and sock.session.has_ticket:
            _SESSIONS.setdefault(self._context, {})[(self.host, self.port)] = sock.session
        return sock.session_reused


def _read_bounded(response: http.client.HTTPResponse) -> bytes:
    """The whole body, refusing more than MAX_ANSWER_BYTES.

    Read in chunks: `read(n)` allocates n bytes up front, and a 16 MiB buffer per
    answer was most of the agent's memory.
    """
    chunks, size = [], 0
    while chunk := response.read(READ_CHUNK):
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise http.client.HTTPException(f"answer larger than {MAX_ANSWER_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the server's certificate is not trusted ({exc.verify_message})"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__
