"""The verified TLS client certificate of a request, on either TLS stack.

`certfleet.tls` transports (and its stdlib view) offer `peercert_x509`;
asyncio's own SSL transport (aiohttp's `SockSite` with an `ssl.SSLContext`)
offers the `ssl_object`. The TLS layer verified the chain against the
factory's CAs before the request got here; which device it is, and whether it
may connect, is for `identity.py` to decide.
"""

from __future__ import annotations

from aiohttp import web
from cryptography import x509


def client_cert(request: web.BaseRequest) -> x509.Certificate | None:
    """The client certificate the connection verified, or None if the client sent none."""
    transport = request.transport
    if transport is None:
        return None
    cert = transport.get_extra_info("peercert_x509")
    if cert is not None:
        return cert
    sslobj = transport.get_extra_info("ssl_object")
    der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    return x509.load_der_x509_certificate(der) if der else None
