"""TLS client authentication with an EC key that stays in a PKCS#11 token, for `ssl`.

The standard `ssl` module (and so aiohttp and http.client) loads private keys
only from files. This module gives an `ssl.SSLContext` a key whose signatures
are made in the token: an OpenSSL EC_KEY carrying the certificate's public key
and an EC_KEY_METHOD whose ECDSA callbacks ask the token, through the same
python-pkcs11 session (`open_token_session`) that `Pkcs11Signer` uses.

Why not OpenSSL's pkcs11 engine (libp11, Debian libengine-pkcs11-openssl),
the way aktualizr does it: it works on its own, but in a process that also
uses python-pkcs11 (the agent makes CSRs and new keys in the same token) two
PKCS#11 stacks share one module instance. Whichever initialises second gets
CKR_CRYPTOKI_ALREADY_INITIALIZED (python-pkcs11 then refuses to load), either
side's C_Finalize (python-pkcs11 re-scans slots that way) kills the other's
sessions, the login is shared so a wrong PIN given to the engine goes
unnoticed, and libp11 writes to stderr. With one stack there is one
initialisation, one login (PIN checked by us) and one lock per token.

Why ctypes: the `ssl` module exposes neither its SSL_CTX nor a way to set an
EVP_PKEY. We call the OpenSSL the `_ssl` extension itself resolves (dlsym in
its own dependency scope, so never a second libcrypto), read the SSL_CTX
pointer that CPython keeps right after the object header of `_ssl._SSLContext`,
and prove it is that context before using it: the pointer lies in writable
anonymous memory, OpenSSL reports TLS_client_method for it, and an option
flipped through Python is seen through the pointer. Any mismatch raises
`TokenTlsError` rather than guessing.

Limits: EC keys on P-256 and P-384 (what certfleet issues); OpenSSL 3.x as
the `ssl` module's library (EC_KEY_METHOD is deprecated in 3.0 but present
through 3.x); Linux (/proc/self/maps); CPython. The token signs in the thread
that runs the handshake, so an asyncio loop waits for it (a few ms on
SoftHSM2, once per full handshake; resumed sessions do not sign).
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import os
import ssl
import sys
import weakref
from ctypes import POINTER, c_char_p, c_int, c_long, c_uint, c_ulong, c_void_p
from dataclasses import dataclass, field
from typing import Any

import pkcs11
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from pkcs11 import KeyType, Mechanism, ObjectClass

from certfleet.pki.errors import PkiError
from certfleet.pki.pkcs11_signer import Pkcs11Ref, open_token_session, resolve_pin

log = logging.getLogger(__name__)

_EVP_PKEY_EC = 408  # NID_X9_62_id_ecPublicKey
_CRYPTO_EX_INDEX_EC_KEY = 8
_CURVES = {"secp256r1": 32, "secp384r1": 48}  # curve -> order length in bytes


class TokenTlsError(PkiError):
    """A token key cannot be used for TLS here; the message says why."""


@dataclass(frozen=True)
class TokenKey:
    """A client key in a PKCS#11 token: `ref` names it (by id, label or both), never the PIN.

    `pin` None means CERTFLEET_HSM_PIN or the URI's pin-source.
    """

    ref: Pkcs11Ref
    pin: str | None = field(default=None, repr=False)


def use_token_key(context: ssl.SSLContext, chain_pem: bytes, key: TokenKey) -> None:
    """Make `context` present `chain_pem` (leaf first) and sign its handshakes in the token.

    The token key must be the one the leaf certificate is for; that is proven
    with one signature here, so a mismatch fails now and not in a handshake.
    """
    openssl = _openssl()
    ctx = _ssl_ctx_pointer(openssl, context)
    chain = x509.load_pem_x509_certificates(chain_pem)
    public = chain[0].public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name not in _CURVES:
        raise TokenTlsError("a token TLS key must be EC on P-256 or P-384")
    signer = _TokenSigner(key, public)
    signer.check()
    openssl.ERR_clear_error()
    _use_chain(openssl, ctx, chain_pem)
    spki = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    handle = next(_handles)
    pkey = openssl.make_pkey(spki, handle)
    try:
        _signers[handle] = signer
        # The key is used only through this context (an SSL object keeps its
        # context alive), so the signer goes when the context does.
        weakref.finalize(context, _signers.pop, handle, None)
        if openssl.SSL_CTX_use_PrivateKey(ctx, pkey) != 1:
            raise TokenTlsError(f"OpenSSL refused the token key: {openssl.errors()}")
        if openssl.SSL_CTX_check_private_key(ctx) != 1:
            raise TokenTlsError(f"the certificate does not match the key: {openssl.errors()}")
    finally:
        openssl.EVP_PKEY_free(pkey)


def support_problem() -> str | None:
    """Why token TLS keys cannot work in this process, or None if they can."""
    try:
        openssl = _openssl()
        _ssl_ctx_pointer(openssl, ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    except TokenTlsError as exc:
        return str(exc)
    return None


def openssl_library() -> str:
    """The file of the OpenSSL that token TLS keys call (the `ssl` module's own)."""
    return _openssl().library


class _TokenSigner:
    """Raw ECDSA on digests with the token key; looks the key up per signature."""

    def __init__(self, key: TokenKey, public: ec.EllipticCurvePublicKey) -> None:
        if not (key.ref.key_id or key.ref.label):
            raise TokenTlsError("name the token key by its id (hex) or label")
        self.ref = key.ref
        self.pin = resolve_pin(key.ref, key.pin)
        self.public = public
        self.order_bytes = _CURVES[public.curve.name]

    def check(self) -> None:
        """Prove that the token key is the certificate's key (and that the PIN works)."""
        digest = hashes.Hash(hashes.SHA256())
        digest.update(b"certfleet token tls key check")
        value = digest.finalize()
        prehashed = ec.ECDSA(utils.Prehashed(hashes.SHA256()))
        try:
            self.public.verify(self.sign_digest(value), value, prehashed)
        except InvalidSignature:
            raise TokenTlsError(
                f"the certificate is not for the key {self._describe()} in token {self.ref.token!r}"
            ) from None

    def sign_digest(self, digest: bytes) -> bytes:
        """DER ECDSA signature of `digest` (cut to the order's length, as ECDSA does)."""
        # Looked up each time: python-pkcs11 re-opens sessions after a slot
        # re-scan, and a stale object handle would fail every later handshake.
        token = open_token_session(self.ref, self.pin)
        query: dict[str, Any] = {"object_class": ObjectClass.PRIVATE_KEY, "key_type": KeyType.EC}
        if self.ref.key_id:
            query["id"] = self.ref.key_id
        if self.ref.label:
            query["label"] = self.ref.label
        with token.lock:
            try:
                private = token.session.get_key(**query)
            except pkcs11.NoSuchKey:
                raise TokenTlsError(
                    f"no EC private key {self._describe()} in token {self.ref.token!r}"
                ) from None
            except pkcs11.MultipleObjectsReturned:
                raise TokenTlsError(f"several keys match {self._describe()}: give its id") from None
            raw = private.sign(digest[: self.order_bytes], mechanism=Mechanism.ECDSA)
        half = len(raw) // 2
        r, s = int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
        return utils.encode_dss_signature(r, s)

    def _describe(self) -> str:
        parts = []
        if self.ref.key_id:
            parts.append(f"with id {self.ref.key_id.hex()}")
        if self.ref.label:
            parts.append(f"labelled {self.ref.label!r}")
        return " and ".join(parts)


_signers: dict[int, _TokenSigner] = {}
_handles = itertools.count(1)

# int sign(int type, const unsigned char *dgst, int dlen, unsigned char *sig,
#          unsigned int *siglen, const BIGNUM *kinv, const BIGNUM *r, EC_KEY *eckey)
_SIGN = ctypes.CFUNCTYPE(
    c_int, c_int, c_void_p, c_int, c_void_p, POINTER(c_uint), c_void_p, c_void_p, c_void_p
)
# ECDSA_SIG *sign_sig(const unsigned char *dgst, int dlen, const BIGNUM *kinv,
#                     const BIGNUM *r, EC_KEY *eckey)
_SIGN_SIG = ctypes.CFUNCTYPE(c_void_p, c_void_p, c_int, c_void_p, c_void_p, c_void_p)


def _signature_for(eckey: int | None, dgst: int | None, dlen: int) -> bytes | None:
    # Runs inside OpenSSL's handshake: never raise into C, fail the signature.
    try:
        if not eckey:
            return None
        signer = _signers.get(_openssl().EC_KEY_get_ex_data(eckey, _openssl().ex_index) or 0)
        if signer is None or not dgst or dlen <= 0:
            return None
        return signer.sign_digest(ctypes.string_at(dgst, dlen))
    except Exception as exc:
        log.warning("token TLS signature failed: %s", exc)
        return None


def _sign(
    _type: int,
    dgst: int | None,
    dlen: int,
    sig: int | None,
    siglen: Any,
    _kinv: int | None,
    _r: int | None,
    eckey: int | None,
) -> int:
    der = _signature_for(eckey, dgst, dlen)
    if der is None or not sig or len(der) > _openssl().ECDSA_size(eckey):
        return 0
    ctypes.memmove(sig, der, len(der))
    siglen[0] = len(der)
    return 1


def _sign_sig(
    dgst: int | None, dlen: int, _kinv: int | None, _r: int | None, eckey: int | None
) -> int | None:
    der = _signature_for(eckey, dgst, dlen)
    if der is None:
        return None
    buf = ctypes.create_string_buffer(der, len(der))
    cursor = c_void_p(ctypes.addressof(buf))
    return _openssl().d2i_ECDSA_SIG(None, ctypes.byref(cursor), len(der))


class _Dlinfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", c_char_p),
        ("dli_fbase", c_void_p),
        ("dli_sname", c_char_p),
        ("dli_saddr", c_void_p),
    ]


_FUNCTIONS: dict[str, tuple[Any, list[Any]]] = {
    "OpenSSL_version_num": (c_ulong, []),
    "ERR_get_error": (c_ulong, []),
    "ERR_clear_error": (None, []),
    "ERR_error_string_n": (None, [c_ulong, c_char_p, ctypes.c_size_t]),
    "TLS_client_method": (c_void_p, []),
    "SSL_CTX_get_ssl_method": (c_void_p, [c_void_p]),
    "SSL_CTX_get_options": (ctypes.c_uint64, [c_void_p]),
    "SSL_CTX_use_certificate_chain_file": (c_int, [c_void_p, c_char_p]),
    "SSL_CTX_use_PrivateKey": (c_int, [c_void_p, c_void_p]),
    "SSL_CTX_check_private_key": (c_int, [c_void_p]),
    "EC_KEY_OpenSSL": (c_void_p, []),
    "EC_KEY_METHOD_new": (c_void_p, [c_void_p]),
    "EC_KEY_METHOD_get_sign": (None, [c_void_p, c_void_p, POINTER(c_void_p), c_void_p]),
    "EC_KEY_METHOD_set_sign": (None, [c_void_p, c_void_p, c_void_p, c_void_p]),
    "EC_KEY_set_method": (c_int, [c_void_p, c_void_p]),
    "EC_KEY_set_ex_data": (c_int, [c_void_p, c_int, c_void_p]),
    "EC_KEY_get_ex_data": (c_void_p, [c_void_p, c_int]),
    "EC_KEY_free": (None, [c_void_p]),
    "CRYPTO_get_ex_new_index": (
        c_int,
        [c_int, c_long, c_void_p, c_void_p, c_void_p, c_void_p],
    ),
    "d2i_EC_PUBKEY": (c_void_p, [c_void_p, POINTER(c_void_p), c_long]),
    "d2i_ECDSA_SIG": (c_void_p, [c_void_p, POINTER(c_void_p), c_long]),
    "ECDSA_size": (c_int, [c_void_p]),
    "EVP_PKEY_new": (c_void_p, []),
    "EVP_PKEY_assign": (c_int, [c_void_p, c_int, c_void_p]),
    "EVP_PKEY_free": (None, [c_void_p]),
}


class _OpenSsl:
    """The functions we need, from the very library the `_ssl` module uses."""

    def __init__(self) -> None:
        import _ssl

        path = getattr(_ssl, "__file__", None)
        if not path:
            raise TokenTlsError("the ssl module is built into the interpreter; cannot reach it")
        # dlsym on _ssl's own handle searches _ssl and then its dependencies,
        # i.e. exactly the libssl/libcrypto (or static copy) it was linked with.
        scope = ctypes.CDLL(path)
        for name, (restype, argtypes) in _FUNCTIONS.items():
            try:
                function = getattr(scope, name)
            except AttributeError:
                raise TokenTlsError(
                    f"the ssl module's OpenSSL has no {name} (needs OpenSSL 3.x with "
                    f"exported symbols; it is {ssl.OPENSSL_VERSION})"
                ) from None
            function.restype, function.argtypes = restype, argtypes
            setattr(self, name, function)
        version = self.OpenSSL_version_num()
        if version != ssl.OPENSSL_VERSION_NUMBER:
            raise TokenTlsError(
                f"resolved OpenSSL {version:#x}, but the ssl module runs "
                f"{ssl.OPENSSL_VERSION_NUMBER:#x}; refusing to mix libraries"
            )
        if version >> 28 != 3:
            raise TokenTlsError(f"token TLS keys need OpenSSL 3.x; ssl uses {ssl.OPENSSL_VERSION}")
        self.library = _library_of(self.EVP_PKEY_new)
        self.ex_index = self.CRYPTO_get_ex_new_index(
            _CRYPTO_EX_INDEX_EC_KEY, 0, None, None, None, None
        )
        if self.ex_index < 0:
            raise TokenTlsError("OpenSSL gave no EC_KEY ex_data index")
        self.method = self._method()

    def _method(self) -> int:
        method = self.EC_KEY_METHOD_new(self.EC_KEY_OpenSSL())
        if not method:
            raise TokenTlsError("OpenSSL could not make an EC_KEY_METHOD")
        setup = c_void_p()
        self.EC_KEY_METHOD_get_sign(method, None, ctypes.byref(setup), None)
        # Kept for the life of the process: OpenSSL holds these pointers.
        self.callbacks = (_SIGN(_sign), _SIGN_SIG(_sign_sig))
        sign, sign_sig = (ctypes.cast(c, c_void_p) for c in self.callbacks)
        self.EC_KEY_METHOD_set_sign(method, sign, setup, sign_sig)
        return method

    def make_pkey(self, spki: bytes, handle: int) -> int:
        """An EVP_PKEY holding the public key, whose signatures go to signer `handle`."""
        buf = ctypes.create_string_buffer(spki, len(spki))
        cursor = c_void_p(ctypes.addressof(buf))
        eckey = self.d2i_EC_PUBKEY(None, ctypes.byref(cursor), len(spki))
        if not eckey:
            raise TokenTlsError(f"OpenSSL cannot read the certificate's key: {self.errors()}")
        pkey = self.EVP_PKEY_new()
        ok = (
            pkey
            and self.EC_KEY_set_method(eckey, self.method) == 1
            and self.EC_KEY_set_ex_data(eckey, self.ex_index, handle) == 1
            # A key whose method is not OpenSSL's own stays on the legacy
            # path in OpenSSL 3, so signing calls our method, not a provider.
            and self.EVP_PKEY_assign(pkey, _EVP_PKEY_EC, eckey) == 1
        )
        if not ok:
            if pkey:
                self.EVP_PKEY_free(pkey)
            self.EC_KEY_free(eckey)
            raise TokenTlsError(f"OpenSSL refused the token key object: {self.errors()}")
        return pkey

    def errors(self) -> str:
        """OpenSSL's error queue as text (emptied)."""
        found = []
        while code := self.ERR_get_error():
            buf = ctypes.create_string_buffer(256)
            self.ERR_error_string_n(code, buf, len(buf))
            found.append(buf.value.decode(errors="replace"))
        return "; ".join(found) or "no reason given"


@functools.cache
def _openssl_or_reason() -> _OpenSsl | str:
    if sys.implementation.name != "cpython" or not sys.platform.startswith("linux"):
        return "token TLS keys need CPython on Linux"
    try:
        return _OpenSsl()
    except TokenTlsError as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot reach the ssl module's OpenSSL: {exc}"


def _openssl() -> _OpenSsl:
    found = _openssl_or_reason()
    if isinstance(found, str):
        raise TokenTlsError(found)
    return found


def _library_of(function: Any) -> str:
    info = _Dlinfo()
    address = ctypes.cast(function, c_void_p)
    libc = ctypes.CDLL(None)
    libc.dladdr.argtypes = [c_void_p, POINTER(_Dlinfo)]
    if not libc.dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        raise TokenTlsError("cannot tell which library OpenSSL's functions come from")
    return os.fsdecode(info.dli_fname)


def _ssl_ctx_pointer(openssl: _OpenSsl, context: ssl.SSLContext) -> int:
    """The SSL_CTX* inside `context`, after proving it is that one."""
    import _ssl

    if not isinstance(context, _ssl._SSLContext):
        raise TokenTlsError("not an ssl.SSLContext")
    if context.protocol != ssl.PROTOCOL_TLS_CLIENT:
        raise TokenTlsError("token TLS keys are for client contexts (PROTOCOL_TLS_CLIENT)")
    # CPython: struct PySSLContext { PyObject_HEAD; SSL_CTX *ctx; ... }
    offset = object.__basicsize__
    if _ssl._SSLContext.__basicsize__ < offset + ctypes.sizeof(c_void_p):
        raise TokenTlsError("this Python's SSLContext layout is not the one we know")
    pointer = c_void_p.from_address(id(context) + offset).value
    if not pointer or not _in_anonymous_writable_memory(pointer):
        raise TokenTlsError("this Python's SSLContext layout is not the one we know")
    if openssl.SSL_CTX_get_ssl_method(pointer) != openssl.TLS_client_method():
        raise TokenTlsError("the SSLContext's OpenSSL object is not where we expected")
    before = int(context.options)
    try:
        context.options = ssl.Options(before ^ ssl.OP_NO_TICKET)
        flipped = int(context.options)
        seen_flipped = openssl.SSL_CTX_get_options(pointer)
    finally:
        context.options = ssl.Options(before)
    seen_before = openssl.SSL_CTX_get_options(pointer)
    if flipped == before or seen_flipped != flipped or seen_before != before:
        raise TokenTlsError("the SSLContext's OpenSSL object does not follow the context")
    return pointer


def _in_anonymous_writable_memory(address: int) -> bool:
    # Reading a field through a wrong pointer could crash; an SSL_CTX is
    # malloc'd, so it must sit in the heap or an anonymous writable mapping.
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, _, end = fields[0].partition("-")
            if int(start, 16) <= address < int(end, 16) - 64:
                path = fields[5] if len(fields) > 5 else ""
                return fields[1].startswith("rw") and path in ("", "[heap]")
    return False


def _use_chain(openssl: _OpenSsl, ctx: int, chain_pem: bytes) -> None:
    # OpenSSL reads chains from files; a memfd keeps this one off the disk.
    fd = os.memfd_create("certfleet-chain", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "wb") as out:
            out.write(chain_pem)
        name = f"/proc/self/fd/{fd}".encode()
        if openssl.SSL_CTX_use_certificate_chain_file(ctx, name) != 1:
            raise TokenTlsError(f"OpenSSL refused the certificate chain: {openssl.errors()}")
    finally:
        os.close(fd)
