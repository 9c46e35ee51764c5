"""Server and client TLS contexts for both stacks.

"openssl4" builds a pyOpenSSL `SSL.Context` on the OpenSSL bundled with
cryptography; "stdlib" builds an `ssl.SSLContext` on the interpreter's OpenSSL.
Both allow TLS 1.2 and 1.3 with ECDHE only and verify peers against the CA
certificates given, each of which is a trust anchor (device CAs need not be
roots).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import SSL, crypto
from OpenSSL._util import lib as _lib

Stack = Literal["openssl4", "stdlib"]
CertSource = str | os.PathLike[str] | x509.Certificate | Sequence[x509.Certificate]
KeySource = str | os.PathLike[str] | PrivateKeyTypes

# TLS 1.2 suites; every one is ECDHE with an AEAD.
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "ECDHE-RSA-AES256-GCM-SHA384",
    ]
)
TLS13_SUITES = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384"
GROUPS = "X25519:P-256"
# Resumption of a session with a verified client cert needs a session id
# context; every worker must use the same one.
SESSION_ID_CONTEXT = b"certfleet"
DEFAULT_SESSION_LIFETIME = 12 * 3600


def load_certs(source: CertSource) -> list[x509.Certificate]:
    """Certificates from a PEM file (leaf first), one certificate or a list."""
    if isinstance(source, str | os.PathLike):
        return x509.load_pem_x509_certificates(Path(source).read_bytes())
    if isinstance(source, x509.Certificate):
        return [source]
    return list(source)


def load_key(source: KeySource, password: bytes | None = None) -> PrivateKeyTypes:
    """A private key from a PEM file, or the key object itself."""
    if isinstance(source, str | os.PathLike):
        return serialization.load_pem_private_key(Path(source).read_bytes(), password)
    return source


def server_context(
    cert: CertSource,
    key: KeySource,
    trusted_cas: CertSource,
    *,
    require_client_cert: bool = True,
    stack: Stack = "openssl4",
    session_lifetime: int = DEFAULT_SESSION_LIFETIME,
) -> SSL.Context | ssl.SSLContext:
    """A server context that asks for a client cert and verifies it against `trusted_cas`.

    With `require_client_cert=False` a client without a cert gets through (EST
    bootstrap with HTTP Basic); a client cert that does not verify never does.
    """
    chain, private_key, cas = load_certs(cert), load_key(key), load_certs(trusted_cas)
    if stack == "openssl4":
        return _openssl4_server(chain, private_key, cas, require_client_cert, session_lifetime)
    if stack == "stdlib":
        return _stdlib_server(chain, private_key, cas, require_client_cert)
    raise ValueError(f"unknown TLS stack {stack!r}")


def trust_more(ctx: SSL.Context | ssl.SSLContext, cas: list[x509.Certificate]) -> None:
    """Trust further client CAs in a server context in use; new handshakes see them."""
    if isinstance(ctx, ssl.SSLContext):
        for ca in cas:
            ctx.load_verify_locations(cadata=ca.public_bytes(serialization.Encoding.DER))
        return
    # pyOpenSSL refuses to change a context once it made a connection, but
    # OpenSSL's X509_STORE takes certificates at any time (it has its own
    # lock). The list of CA names sent in the handshake stays as it was: a
    # hint that device clients, sending the one certificate they have, ignore.
    store = ctx.get_cert_store()
    assert store is not None
    for ca in cas:
        store.add_cert(crypto.X509.from_cryptography(ca))


def client_context(
    cert: CertSource | None,
    key: KeySource | None,
    trust_anchors: CertSource,
    *,
    stack: Stack = "stdlib",
) -> SSL.Context | ssl.SSLContext:
    """A device-side context: client cert (optional), server verified against `trust_anchors`.

    stdlib contexts check the hostname themselves; with "openssl4" open
    connections through `client_connection`, which sets the name to check.
    """
    chain = load_certs(cert) if cert is not None else []
    private_key = load_key(key) if key is not None else None
    anchors = load_certs(trust_anchors)
    if stack == "openssl4":
        return _openssl4_client(chain, private_key, anchors)
    if stack == "stdlib":
        return _stdlib_client(chain, private_key, anchors)
    raise ValueError(f"unknown TLS stack {stack!r}")


def client_connection(
    context: SSL.Context, server_hostname: str, sock: socket.socket | None = None
) -> SSL.Connection:
    """A pyOpenSSL client connection that checks the server name or IP (memory BIO if no sock)."""
    conn = SSL.Connection(context, sock)
    conn.set_connect_state()
    # pyOpenSSL checks no names; OpenSSL does, once told the name.
    param = _lib.SSL_get0_param(conn._ssl)
    name = server_hostname.encode("ascii")
    ip = _ip_or_none(server_hostname)
    if ip is not None:
        ok = _lib.X509_VERIFY_PARAM_set1_ip(param, ip, len(ip))
    else:
        conn.set_tlsext_host_name(name)
        ok = _lib.X509_VERIFY_PARAM_set1_host(param, name, len(name))
    if ok != 1:
        raise ValueError(f"cannot check server name {server_hostname!r}")
    return conn


def _openssl4_server(
    chain: list[x509.Certificate],
    key: PrivateKeyTypes,
    cas: list[x509.Certificate],
    require_client_cert: bool,
    session_lifetime: int,
) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    _openssl4_common(ctx, chain, key, cas)
    mode = SSL.VERIFY_PEER
    if require_client_cert:
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    ctx.set_verify(mode)
    for ca in cas:
        ctx.add_client_ca(ca)
    ctx.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION)
    ctx.set_session_id(SESSION_ID_CONTEXT)
    # Tickets only: a per-process session cache would resume on one worker
    # out of N, while a ticket resumes on any worker that shares the key.
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_timeout(session_lifetime)
    return ctx


def _openssl4_client(
    chain: list[x509.Certificate], key: PrivateKeyTypes | None, anchors: list[x509.Certificate]
) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    _openssl4_common(ctx, chain, key, anchors)
    ctx.set_verify(SSL.VERIFY_PEER)
    return ctx


def _openssl4_common(
    ctx: SSL.Context,
    chain: list[x509.Certificate],
    key: PrivateKeyTypes | None,
    cas: list[x509.Certificate],
) -> None:
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_cipher_list(TLS12_CIPHERS.encode())
    ctx.set_tls13_ciphersuites(TLS13_SUITES.encode())
    ctx.set_options(SSL.OP_NO_COMPRESSION)
    # pyOpenSSL can set only one curve (set_tmp_ecdh); the binding for the
    # list is there, just not wrapped.
    if _lib.SSL_CTX_set1_curves_list(ctx._context, GROUPS.encode()) != 1:
        raise ValueError(f"OpenSSL refused groups {GROUPS}")
    if chain:
        ctx.use_certificate(chain[0])
        for extra in chain[1:]:
            ctx.add_extra_chain_cert(extra)
    if key is not None:
        ctx.use_privatekey(key)
        ctx.check_privatekey()
    store = ctx.get_cert_store()
    assert store is not None
    for ca in cas:
        store.add_cert(crypto.X509.from_cryptography(ca))
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)


def _stdlib_server(
    chain: list[x509.Certificate],
    key: PrivateKeyTypes,
    cas: list[x509.Certificate],
    require_client_cert: bool,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _stdlib_common(ctx, chain, key, cas)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    return ctx


def _stdlib_client(
    chain: list[x509.Certificate], key: PrivateKeyTypes | None, anchors: list[x509.Certificate]
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _stdlib_common(ctx, chain, key, anchors)
    return ctx


def _stdlib_common(
    ctx: ssl.SSLContext,
    chain: list[x509.Certificate],
    key: PrivateKeyTypes | None,
    cas: list[x509.Certificate],
) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.load_verify_locations(cadata=_pem(cas).decode())
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if chain and key is not None:
        _load_cert_chain(ctx, chain, key)


def _load_cert_chain(
    ctx: ssl.SSLContext, chain: list[x509.Certificate], key: PrivateKeyTypes
) -> None:
    # ssl loads keys only from files; a memfd keeps the key off the disk.
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.memfd_create("certfleet-tls", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "wb") as out:
            out.write(_pem(chain) + key_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _ip_or_none(name: str) -> bytes | None:
    try:
        return ipaddress.ip_address(name).packed
    except ValueError:
        return None
