"""ECIES in the Foundries go-ecies wire format, used for device config values.

Ciphertext layout: ``R || IV || C || T``.

- ``R``: the sender's ephemeral public key as an uncompressed point (``04 || X || Y``).
- ``IV``: 16 random bytes; ``C``: AES-CTR encryption of the plaintext.
- ``T``: HMAC over ``IV || C``, full digest length.

Per curve: P-256 uses AES-128 and SHA-256, P-384 AES-192 and SHA-384, P-521
AES-256 and SHA-512. ``Z`` is the ECDH x-coordinate padded to the field size;
``K = ConcatKDF-H(Z, 2 * keylen)`` with no shared info, the AES key is the first
half of ``K`` and the HMAC key is ``H(second half of K)``.

Decryption needs only an ECDH function (``exchange(peer_public) -> Z``), so the
private key may be a file key or a PKCS#11 key that can do ECDH1_DERIVE.
Errors raised by that function (an HSM failure, for instance) are not wrapped.

Empty plaintext: ``encrypt(b"")`` gives a normal, authenticated ciphertext with
an empty ``C`` (113 bytes on P-256) that decrypts back to ``b""``. An empty
ciphertext is always rejected with ``EciesError``. go-ecies writes an empty
plaintext as an empty ciphertext; we refuse to read that back because nothing
authenticates it, so a wiped value cannot pass for a real empty one.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from hmac import compare_digest

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

Exchange = Callable[[ec.EllipticCurvePublicKey], bytes]
"""Returns the raw ECDH shared x-coordinate for a peer public key."""

IV_LEN = 16
SUPPORTED = "P-256, P-384 or P-521"


class EciesError(ValueError):
    """The key, curve or ciphertext cannot be used for ECIES."""


@dataclass(frozen=True)
class _Params:
    name: str
    key_len: int
    hash: type[hashes.HashAlgorithm]
    field_len: int

    @property
    def point_len(self) -> int:
        return 1 + 2 * self.field_len

    @property
    def tag_len(self) -> int:
        return self.hash.digest_size

    @property
    def overhead(self) -> int:
        return self.point_len + IV_LEN + self.tag_len


_PARAMS = {
    "secp256r1": _Params("P-256", 16, hashes.SHA256, 32),
    "secp384r1": _Params("P-384", 24, hashes.SHA384, 48),
    "secp521r1": _Params("P-521", 32, hashes.SHA512, 66),
}


def _params(curve: object) -> _Params:
    params = _PARAMS.get(curve.name) if isinstance(curve, ec.EllipticCurve) else None
    if params is None:
        what = f"curve {curve.name}" if isinstance(curve, ec.EllipticCurve) else repr(curve)
        raise EciesError(f"unsupported {what}: ECIES supports {SUPPORTED}")
    return params


def _key_params(key: object, kind: type, role: str) -> _Params:
    if isinstance(key, kind):
        params = _PARAMS.get(key.curve.name)
        what = f"EC key on {key.curve.name}"
    else:
        params, what = None, type(key).__name__
    if params is None:
        raise EciesError(f"unsupported key type {what}: ECIES needs an EC {role} on {SUPPORTED}")
    return params


def shared_secret(
    exchange: Exchange, curve: ec.EllipticCurve, peer_public: ec.EllipticCurvePublicKey
) -> bytes:
    """ECDH through `exchange`, as the fixed-length x-coordinate Z (go-ecies GenerateShared)."""
    params = _params(curve)
    z = exchange(peer_public)
    if not isinstance(z, bytes) or not z or len(z) > params.field_len:
        got = f"{len(z)} bytes" if isinstance(z, bytes) else type(z).__name__
        want = f"1 to {params.field_len} bytes"
        raise EciesError(f"ECDH for {params.name} must return {want}, got {got}")
    # Some PKCS#11 tokens return Z as an integer without its leading zero bytes.
    return z.rjust(params.field_len, b"\0")


def derive_keys(curve: ec.EllipticCurve, z: bytes) -> tuple[bytes, bytes]:
    """Concat KDF over Z: return (AES key, HMAC key) for `curve`."""
    params = _params(curve)
    k = ConcatKDFHash(params.hash(), 2 * params.key_len, None).derive(z)
    digest = hashes.Hash(params.hash())
    digest.update(k[params.key_len :])
    return k[: params.key_len], digest.finalize()


def _tag(params: _Params, mac_key: bytes, data: bytes) -> bytes:
    mac = HMAC(mac_key, params.hash())
    mac.update(data)
    return mac.finalize()


def _ctr(aes_key: bytes, iv: bytes, data: bytes) -> bytes:
    # CTR is symmetric: the same keystream encrypts and decrypts.
    ctx = Cipher(algorithms.AES(aes_key), modes.CTR(iv)).encryptor()
    return ctx.update(data) + ctx.finalize()


def encrypt(public_key: ec.EllipticCurvePublicKey, plaintext: bytes) -> bytes:
    """Encrypt to `public_key`; returns R || IV || C || T."""
    params = _key_params(public_key, ec.EllipticCurvePublicKey, "public key")
    ephemeral = ec.generate_private_key(public_key.curve)
    z = ephemeral.exchange(ec.ECDH(), public_key)
    aes_key, mac_key = derive_keys(public_key.curve, z)
    iv = os.urandom(IV_LEN)
    body = iv + _ctr(aes_key, iv, plaintext)
    r = ephemeral.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    return r + body + _tag(params, mac_key, body)


def _ephemeral_point(
    params: _Params, curve: ec.EllipticCurve, r: bytes
) -> ec.EllipticCurvePublicKey:
    if r[0] != 4:
        raise EciesError(f"ciphertext does not start with an uncompressed {params.name} point")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, r)
    except ValueError:
        raise EciesError(f"ciphertext ephemeral key is not a point on {params.name}") from None


def decrypt(exchange: Exchange, curve: ec.EllipticCurve, ciphertext: bytes) -> bytes:
    """Decrypt R || IV || C || T, doing ECDH through `exchange` with the recipient key."""
    params = _params(curve)
    if not ciphertext:
        raise EciesError("empty ciphertext: nothing to decrypt (an empty value is never valid)")
    if len(ciphertext) < params.overhead:
        raise EciesError(
            f"ciphertext too short for {params.name} "
            f"(got {len(ciphertext)} bytes, need at least {params.overhead})"
        )
    r = ciphertext[: params.point_len]
    body = ciphertext[params.point_len : -params.tag_len]
    tag = ciphertext[-params.tag_len :]
    peer = _ephemeral_point(params, curve, r)
    aes_key, mac_key = derive_keys(curve, shared_secret(exchange, curve, peer))
    if not compare_digest(_tag(params, mac_key, body), tag):
        raise EciesError("ciphertext authentication failed: wrong key or corrupted data")
    return _ctr(aes_key, body[:IV_LEN], body[IV_LEN:])


def key_exchange(private_key: ec.EllipticCurvePrivateKey) -> Exchange:
    """An `Exchange` backed by an in-memory EC private key."""
    _key_params(private_key, ec.EllipticCurvePrivateKey, "private key")
    return partial(private_key.exchange, ec.ECDH())


def decrypt_with_key(private_key: ec.EllipticCurvePrivateKey, ciphertext: bytes) -> bytes:
    """Decrypt with an in-memory EC private key."""
    return decrypt(key_exchange(private_key), private_key.curve, ciphertext)


def encrypt_b64(public_key: ec.EllipticCurvePublicKey, plaintext: bytes) -> str:
    """`encrypt`, encoded as standard padded base64 for config files."""
    return base64.b64encode(encrypt(public_key, plaintext)).decode("ascii")


def decrypt_b64(exchange: Exchange, curve: ec.EllipticCurve, text: str) -> bytes:
    """`decrypt` a standard base64 ciphertext; surrounding whitespace is ignored."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise EciesError("ciphertext is not valid base64") from None
    return decrypt(exchange, curve, raw)
