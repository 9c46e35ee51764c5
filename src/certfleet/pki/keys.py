"""Key types certfleet accepts, key generation and fingerprints."""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .errors import PkiError

CURVES: dict[str, ec.EllipticCurve] = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1()}
DEFAULT_CURVE = "P-256"


def curve_by_name(name: str) -> ec.EllipticCurve:
    """Return the curve for 'P-256' or 'P-384' (also accepts secp256r1/secp384r1)."""
    aliases = {"secp256r1": "P-256", "prime256v1": "P-256", "secp384r1": "P-384"}
    canonical = aliases.get(name.lower(), name.upper())
    if canonical not in CURVES:
        raise PkiError(f"unsupported key type {name!r}: use one of {', '.join(CURVES)}")
    return CURVES[canonical]


def curve_label(curve: ec.EllipticCurve) -> str:
    """Return 'P-256' or 'P-384' for a supported curve."""
    for label, known in CURVES.items():
        if known.name == curve.name:
            return label
    raise PkiError(f"unsupported curve {curve.name}: use one of {', '.join(CURVES)}")


def check_public_key(key: object) -> ec.EllipticCurvePublicKey:
    """Accept only EC P-256/P-384 public keys; others get a message naming the type."""
    if not isinstance(key, ec.EllipticCurvePublicKey):
        kind = type(key).__name__.lstrip("_").replace("PublicKey", "")
        raise PkiError(
            f"unsupported key type {kind}: certfleet needs EC keys (P-256 or P-384) "
            "because device config is encrypted with ECDH"
        )
    curve_label(key.curve)
    return key


def hash_for_curve(curve: ec.EllipticCurve) -> hashes.HashAlgorithm:
    """Signature hash that matches the curve's strength."""
    return hashes.SHA384() if curve_label(curve) == "P-384" else hashes.SHA256()


def generate_private_key(curve: str = DEFAULT_CURVE) -> ec.EllipticCurvePrivateKey:
    """Generate a new EC private key on a supported curve."""
    return ec.generate_private_key(curve_by_name(curve))


def private_key_pem(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None) -> bytes:
    """Serialize a private key as PKCS#8 PEM, encrypted when a passphrase is given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def public_key_pem(key: ec.EllipticCurvePublicKey) -> str:
    """SubjectPublicKeyInfo PEM of a public key."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def pubkey_sha256(key: ec.EllipticCurvePublicKey) -> str:
    """Hex SHA-256 of the DER SubjectPublicKeyInfo: how certfleet names a key."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def sha256_hex(text: str) -> str | None:
    """A SHA-256 fingerprint as typed (any case, colons allowed) in certfleet's form:
    64 lower-case hex digits; None if it is not one."""
    fingerprint = text.replace(":", "").strip().lower()
    if len(fingerprint) != 64 or any(c not in "0123456789abcdef" for c in fingerprint):
        return None
    return fingerprint


def cert_sha256(cert: x509.Certificate) -> str:
    """Hex SHA-256 fingerprint of a certificate's DER encoding."""
    return cert.fingerprint(hashes.SHA256()).hex()
