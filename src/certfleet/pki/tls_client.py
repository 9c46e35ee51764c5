"""The device agent's TLS client context, for aiohttp and http.client alike.

One function, `client_context`, builds every context the agent uses to talk to
the EST server and the gateway, whether its key is a file or sits in a PKCS#11
token (see `token_tls` for how a token key gets into an `ssl.SSLContext`).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certfleet.pki.pkcs11_signer import Pkcs11Ref, parse_hex_id

from .token_tls import TokenKey, TokenTlsError, support_problem, use_token_key

__all__ = [
    "CertSource",
    "KeySource",
    "TokenKey",
    "TokenTlsError",
    "client_context",
    "support_problem",
    "token_client_context",
]

CertSource = str | os.PathLike[str] | bytes | x509.Certificate | Sequence[x509.Certificate]
KeySource = str | os.PathLike[str] | TokenKey


def client_context(
    trust: Sequence[x509.Certificate] | None,
    cert: CertSource | None = None,
    key: KeySource | None = None,
) -> ssl.SSLContext:
    """A client context: the server checked against `trust`, our certificate presented.

    trust: the anchors (factory root) the server must chain to, hostname
        checked; None turns verification off and is only for the RFC 7030
        bootstrap of `cacerts`, whose answer a person must confirm.
    cert: PEM file path, PEM bytes, or certificate(s), leaf first; None for
        no client certificate.
    key: PEM key file path, or a `TokenKey` (PKCS#11 URI parts and PIN) whose
        key never leaves the token; None with a file `cert` means the key is
        in the same PEM file.

    TLS 1.2 or 1.3. Token keys are EC P-256/P-384 and need the interpreter's
    `ssl` on OpenSSL 3 (`support_problem()` says why not, if not); a bad PIN,
    missing key or a certificate for another key raises a `PkiError`
    (`TokenTlsError` for what is TLS-specific) with the reason, never the PIN.
    """
    if trust is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in trust)
        context = ssl.create_default_context(cadata=pem)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is None:
        if key is not None:
            raise ValueError("a client key needs its certificate")
        return context
    if isinstance(key, TokenKey):
        use_token_key(context, _chain_pem(cert), key)
    elif isinstance(cert, str | os.PathLike):
        context.load_cert_chain(cert, key)
    else:
        if key is None:
            raise ValueError("certificates given in memory need a key file")
        _load_chain_from_memory(context, _chain_pem(cert), key)
    return context


class TokenSlotsLike(Protocol):
    """What `token_client_context` reads: module, token label, key id (hex) and PIN."""

    @property
    def module(self) -> str: ...
    @property
    def label(self) -> str: ...
    @property
    def key_id(self) -> str: ...
    @property
    def pin(self) -> str | None: ...


def token_client_context(
    trust: Sequence[x509.Certificate], cert: CertSource, slots: TokenSlotsLike
) -> ssl.SSLContext:
    """`client_context` for a key in token slot `slots.key_id` (as `sota.toml [p11]` names it)."""
    ref = Pkcs11Ref(slots.module, slots.label, key_id=parse_hex_id(slots.key_id))
    return client_context(trust, cert, TokenKey(ref, slots.pin))


def _chain_pem(cert: CertSource) -> bytes:
    if isinstance(cert, bytes):
        return cert
    if isinstance(cert, str | os.PathLike):
        return Path(cert).read_bytes()
    certs = [cert] if isinstance(cert, x509.Certificate) else list(cert)
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _load_chain_from_memory(
    context: ssl.SSLContext, chain_pem: bytes, key: str | os.PathLike[str]
) -> None:
    # ssl reads certificates only from files; a memfd avoids a temporary file.
    fd = os.memfd_create("certfleet-chain", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "wb") as out:
            out.write(chain_pem)
        context.load_cert_chain(f"/proc/self/fd/{fd}", key)
    finally:
        os.close(fd)
