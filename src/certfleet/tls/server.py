"""Listening TLS servers on either stack, for aiohttp's low-level server or any asyncio protocol."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

from cryptography import x509
from OpenSSL import SSL

from .tickets import TicketKeys
from .transport import DEFAULT_HANDSHAKE_TIMEOUT, TLSServerProtocol, stats

log = logging.getLogger(__name__)


async def start_tls_server(
    protocol_factory: Callable[[], asyncio.Protocol],
    host: str | None,
    port: int | None,
    context: SSL.Context | ssl.SSLContext,
    *,
    sock: socket.socket | None = None,
    reuse_port: bool = False,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    ticket_keys: TicketKeys | None = None,
    backlog: int = 1024,
) -> asyncio.AbstractServer:
    """Serve `protocol_factory` (e.g. `web.AppRunner(app).server`) over TLS.

    The context picks the stack: `SSL.Context` runs our pyOpenSSL transport,
    `ssl.SSLContext` asyncio's own. Pass `sock` (already listening) instead of
    host and port to share one socket between pre-forked workers.
    """
    loop = asyncio.get_running_loop()
    listen: dict[str, Any] = {"sock": sock, "backlog": backlog}
    if sock is None:
        listen.update(host=host, port=port, reuse_port=reuse_port or None)
    if isinstance(context, ssl.SSLContext):
        if ticket_keys is not None:
            log.warning("ticket_keys apply to the openssl4 stack only; stdlib keeps its own")
        return await loop.create_server(
            lambda: _StdlibShim(protocol_factory()),
            ssl=context,
            ssl_handshake_timeout=handshake_timeout,
            **listen,
        )

    def tls_protocol() -> TLSServerProtocol:
        if ticket_keys is not None:
            ticket_keys.refresh(context)
        return TLSServerProtocol(context, protocol_factory, handshake_timeout)

    if ticket_keys is not None:
        ticket_keys.refresh(context)
    return await loop.create_server(tls_protocol, **listen)


class _StdlibShim(asyncio.Protocol):
    """Hands the app asyncio's SSL transport behind a view with the openssl4 stack's extras."""

    def __init__(self, app: asyncio.Protocol) -> None:
        self._app = app

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        view = StdlibTransportView(transport)
        stats.completed += 1
        stats.resumed += bool(view.get_extra_info("session_reused"))
        self._app.connection_made(view)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self._app.data_received(data)

    def eof_received(self) -> bool | None:
        return self._app.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._app.connection_lost(exc)

    def pause_writing(self) -> None:
        self._app.pause_writing()

    def resume_writing(self) -> None:
        self._app.resume_writing()


class StdlibTransportView:
    """asyncio's SSL transport, plus the TLS extras of the openssl4 transport."""

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._cache: dict[str, Any] = {}

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """Like the openssl4 transport's; the rest comes from asyncio's transport."""
        getter = _STDLIB_EXTRA.get(name)
        if getter is None:
            return self._transport.get_extra_info(name, default)
        if name not in self._cache:
            sslobj = self._transport.get_extra_info("ssl_object")
            if sslobj is None:
                return default
            self._cache[name] = getter(sslobj)
        return self._cache[name]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _stdlib_peer_cert(sslobj: ssl.SSLObject) -> x509.Certificate | None:
    der = sslobj.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None


def _stdlib_peer_chain(sslobj: ssl.SSLObject) -> list[x509.Certificate] | None:
    # Python 3.13 added get_verified_chain; 3.11 and 3.12 can't give the chain.
    get_chain = getattr(sslobj, "get_verified_chain", None)
    if get_chain is None:
        return None
    return [x509.load_der_x509_certificate(der) for der in get_chain()]


def _stdlib_tls_unique(sslobj: ssl.SSLObject) -> bytes | None:
    if sslobj.version() != "TLSv1.2":
        return None
    return sslobj.get_channel_binding("tls-unique")


_STDLIB_EXTRA: dict[str, Callable[[ssl.SSLObject], Any]] = {
    "peercert_x509": _stdlib_peer_cert,
    "peer_chain": _stdlib_peer_chain,
    "tls_version": lambda sslobj: sslobj.version(),
    "tls_unique": _stdlib_tls_unique,
    "session_reused": lambda sslobj: sslobj.session_reused,
}
