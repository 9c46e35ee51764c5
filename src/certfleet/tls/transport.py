"""Server-side TLS over asyncio with pyOpenSSL in memory-BIO mode.

A `TLSServerProtocol` sits between two layers: it is the protocol of a plain
TCP transport, and the transport of an app protocol (aiohttp's
RequestHandler). Ciphertext from TCP goes into the SSL object with bio_write;
plaintext comes out with recv and goes to the app; app writes go in with
send, and whatever OpenSSL produces (handshake, records, alerts) leaves
through bio_read to TCP a pass or two of the event loop later, so that pieces
queued together (a response and its close_notify, say) share one send(): on
loopback a send() costs about as much as the handshake's crypto. Past 64 KiB
a write is sent at once, so the TCP transport's buffer and flow control stay
the app's buffer and flow control.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

from cryptography import x509
from OpenSSL import SSL
from OpenSSL._util import lib as _lib

log = logging.getLogger(__name__)

RECV_SIZE = 32 * 1024  # a TLS record carries at most 16 KiB
BIO_READ_SIZE = 64 * 1024
FLUSH_NOW = 64 * 1024  # app bytes past which a write is sent without waiting
DEFAULT_HANDSHAKE_TIMEOUT = 10.0


@dataclass
class HandshakeStats:
    """Server handshakes in this process, by outcome."""

    completed: int = 0
    resumed: int = 0
    failed: int = 0
    timed_out: int = 0


stats = HandshakeStats()


class TLSServerProtocol(asyncio.Protocol, asyncio.Transport):
    """One server-side TLS connection: protocol for the TCP transport, transport for the app."""

    def __init__(
        self,
        context: SSL.Context,
        app_factory: Callable[[], asyncio.Protocol],
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    ) -> None:
        super().__init__({"sslcontext": context})
        self._loop = asyncio.get_running_loop()
        self._conn = SSL.Connection(context, None)
        self._conn.set_accept_state()
        self._app_factory = app_factory
        self._handshake_timeout = handshake_timeout
        self._tcp: asyncio.Transport | None = None
        self._app: asyncio.BaseProtocol | None = None  # set once the handshake is done
        self._peer: Any = None
        self._timer: asyncio.TimerHandle | None = None
        self._bytes_seen = False
        self._handshake_over = False
        self._closing = False
        self._eof = False
        self._reading_paused = False
        self._writing_paused = False
        self._flush_scheduled = False
        self._unflushed = 0

    # TCP side: called by the TCP transport.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # No isinstance check: uvloop's transports don't subclass asyncio's.
        self._tcp = cast(asyncio.Transport, transport)
        self._peer = transport.get_extra_info("peername")
        self._timer = self._loop.call_later(self._handshake_timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        self._bytes_seen = True
        self._conn.bio_write(data)
        if self._app is not None:
            # What recv may queue (a KeyUpdate answer, a warning alert) can go
            # out with the next write; errors and close_notify flush themselves.
            self._deliver()
        elif self._handshake() and not self._deliver():
            # Our last flight (TLS 1.3: tickets) must leave now unless the request
            # came along: until it is ACKed, a client with Nagle on holds its
            # request (for up to 40 ms, the delayed ACK). If it came, the flight
            # can share the response's send().
            self._flush_soon()

    def eof_received(self) -> bool:
        if self._app is None:
            self._fail("peer closed the connection during the handshake")
            return False
        self._peer_done()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._app is None:
            self._fail("connection lost during the handshake")
        else:
            self._app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._app is not None and not self._writing_paused:
            self._writing_paused = True
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app is not None and self._writing_paused:
            self._writing_paused = False
            self._app.resume_writing()

    # App side: the asyncio.Transport the app sees.

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._app is None:
            return
        try:
            self._conn.sendall(data)
        except SSL.Error as exc:
            self._tls_error(exc)
            return
        self._unflushed += len(data)
        if self._unflushed >= FLUSH_NOW:
            self._flush()
        elif not self._flush_scheduled:
            # Two passes, not one: on Python < 3.12 aiohttp closes the
            # connection one pass after writing the response, and this way
            # the close_notify still shares the response's send().
            self._flush_scheduled = True
            self._loop.call_soon(self._loop.call_soon, self._flush)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        # One write makes one run of full records instead of a record per piece.
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        if self._closing or self._tcp is None:
            return
        self._closing = True
        try:
            self._conn.shutdown()  # queues our close_notify; we don't wait for theirs
        except SSL.Error:
            pass
        self._flush_soon()  # which closes TCP after sending

    def abort(self) -> None:
        self._closing = True
        if self._tcp is not None:
            self._tcp.abort()

    def is_closing(self) -> bool:
        return self._closing

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._closing

    def pause_reading(self) -> None:
        if self._reading_paused or self._tcp is None:
            return
        self._reading_paused = True
        self._tcp.pause_reading()

    def resume_reading(self) -> None:
        if not self._reading_paused or self._tcp is None:
            return
        self._reading_paused = False
        self._tcp.resume_reading()
        # Records already inside the SSL object won't come with new TCP data.
        self._loop.call_soon(self._resume_delivery)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        assert self._tcp is not None
        self._tcp.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        tcp_buffered = self._tcp.get_write_buffer_size() if self._tcp is not None else 0
        return self._unflushed + tcp_buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        assert self._tcp is not None
        return self._tcp.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._app is not None
        return self._app

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """TCP extras plus peercert_x509, peer_chain, tls_version, tls_unique, session_reused."""
        if name in self._extra:
            return self._extra[name]
        getter = TLS_EXTRA.get(name)
        if getter is not None:
            if self._app is None:
                return default
            value = self._extra[name] = getter(self._conn)
            return value
        if self._tcp is None:
            return default
        return self._tcp.get_extra_info(name, default)

    # Inside.

    def _handshake(self) -> bool:
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            self._flush_soon()
            return False
        except SSL.Error as exc:
            self._fail(_reason(exc))  # sends OpenSSL's alert, which tells the client why
            return False
        self._end_handshake()
        stats.completed += 1
        stats.resumed += session_reused(self._conn)
        self._app = self._app_factory()
        self._app.connection_made(self)
        return True

    def _deliver(self) -> bool:
        """Pass decrypted data to the app while it reads; True if there was any."""
        delivered = False
        while not self._reading_paused and not self._closing:
            try:
                data = self._conn.recv(RECV_SIZE)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:  # close_notify
                self._peer_done()
                break
            except SSL.Error as exc:
                self._tls_error(exc)
                break
            cast(asyncio.Protocol, self._app).data_received(data)
            delivered = True
        return delivered

    def _resume_delivery(self) -> None:
        if self._app is not None and not self._closing:
            self._deliver()

    def _flush_soon(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Send what OpenSSL has queued; then close TCP if we are closing."""
        self._flush_scheduled = False
        self._unflushed = 0
        tcp = self._tcp
        if tcp is None or tcp.is_closing():
            return
        while True:
            try:
                data = self._conn.bio_read(BIO_READ_SIZE)
            except SSL.WantReadError:
                break
            tcp.write(data)
            if len(data) < BIO_READ_SIZE:
                break
        if self._closing:
            tcp.close()

    def _peer_done(self) -> None:
        """The peer will send no more (close_notify or TCP EOF): the app decides what's next."""
        if self._eof:
            return
        self._eof = True
        if not cast(asyncio.Protocol, self._app).eof_received():
            self.close()

    def _timed_out(self) -> None:
        self._timer = None
        self._end_handshake()
        stats.timed_out += 1
        log.info("TLS handshake with %s timed out after %g s", self._peer, self._handshake_timeout)
        self.abort()

    def _fail(self, reason: str) -> None:
        """End a handshake that won't complete; log it once, at INFO, without a traceback."""
        if self._handshake_over:
            return
        self._end_handshake()
        if self._bytes_seen:
            stats.failed += 1
            log.info("TLS handshake with %s failed: %s", self._peer, reason)
        else:
            # Port probes and load balancer health checks send nothing.
            log.debug("connection from %s closed before a ClientHello", self._peer)
        self._closing = True
        self._flush_soon()

    def _end_handshake(self) -> None:
        self._handshake_over = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tls_error(self, exc: SSL.Error) -> None:
        log.info("TLS error from %s: %s", self._peer, _reason(exc))
        self._closing = True
        self._flush_soon()


def session_reused(conn: SSL.Connection) -> bool:
    """Whether this connection resumed a session (pyOpenSSL doesn't wrap SSL_session_reused)."""
    return bool(_lib.SSL_session_reused(conn._ssl))


def tls_unique(conn: SSL.Connection) -> bytes | None:
    """RFC 5929 tls-unique for TLS 1.2: the first Finished of the latest handshake; None on 1.3."""
    if conn.get_protocol_version_name() != "TLSv1.2":
        return None  # RFC 8446 §C.5: undefined for TLS 1.3
    # A full handshake begins with the client's Finished, a resumed one with the server's.
    return conn.get_finished() if session_reused(conn) else conn.get_peer_finished()


def _peer_cert(conn: SSL.Connection) -> x509.Certificate | None:
    return conn.get_peer_certificate(as_cryptography=True)


def _peer_chain(conn: SSL.Connection) -> list[x509.Certificate] | None:
    return conn.get_verified_chain(as_cryptography=True)


def _tls_version(conn: SSL.Connection) -> str:
    return conn.get_protocol_version_name()


TLS_EXTRA: dict[str, Callable[[SSL.Connection], Any]] = {
    "peercert_x509": _peer_cert,
    "peer_chain": _peer_chain,
    "tls_version": _tls_version,
    "tls_unique": tls_unique,
    "session_reused": session_reused,
}


def _reason(exc: SSL.Error) -> str:
    """OpenSSL's reasons, e.g. 'peer did not return a certificate'."""
    if isinstance(exc, SSL.SysCallError):
        return exc.args[1] if len(exc.args) > 1 else "connection reset"
    errors = exc.args[0] if exc.args else None
    if isinstance(errors, list) and errors:
        return "; ".join(str(e[-1]) for e in errors)
    return str(exc) or type(exc).__name__
