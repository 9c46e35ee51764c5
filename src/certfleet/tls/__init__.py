"""TLS for the certfleet servers: contexts, a pyOpenSSL asyncio transport, shared ticket keys.

Two stacks: "openssl4" (pyOpenSSL on the OpenSSL bundled with cryptography,
through our memory-BIO transport) and "stdlib" (the interpreter's ssl module
through asyncio's own transport). Handlers read the peer the same way on
both: `request.transport.get_extra_info("peercert_x509")`, "peer_chain",
"tls_version", "tls_unique", "session_reused".
"""

from .contexts import Stack, client_connection, client_context, load_certs, load_key, server_context
from .server import StdlibTransportView, start_tls_server
from .tickets import TicketKeys
from .transport import HandshakeStats, TLSServerProtocol, stats

__all__ = [
    "HandshakeStats",
    "Stack",
    "StdlibTransportView",
    "TLSServerProtocol",
    "TicketKeys",
    "client_connection",
    "client_context",
    "load_certs",
    "load_key",
    "server_context",
    "start_tls_server",
    "stats",
]
