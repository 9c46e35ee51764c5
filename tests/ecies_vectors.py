"""Readers for the go-ecies interop vectors in ../shared/interop/go-ecies."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

VECTOR_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "interop" / "go-ecies"

# Go's big.Int.Text(62) digit order.
BASE62_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

CURVES = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1, "P-521": ec.SECP521R1}


def base62_int(text: str) -> int:
    """Parse a non-negative integer written by Go's big.Int.Text(62)."""
    if not text:
        raise ValueError("empty base-62 number")
    value = 0
    for ch in text:
        digit = BASE62_DIGITS.find(ch)
        if digit < 0:
            raise ValueError(f"bad base-62 digit {ch!r} in {text!r}")
        value = value * 62 + digit
    return value


def load(name: str) -> dict[str, dict]:
    """Load one vector file, failing with a message that says where it was looked for."""
    path = VECTOR_DIR / name
    if not path.is_file():
        raise FileNotFoundError(
            f"go-ecies vectors not found: {path} (expected the shared interop checkout "
            "beside the repository, at <repo>/../shared/interop/go-ecies)"
        )
    return json.loads(path.read_text())


def curve(vector: dict) -> ec.EllipticCurve:
    return CURVES[vector["Curve"]]()


def private_key(vector: dict) -> ec.EllipticCurvePrivateKey:
    """The vector's `Private` key, checked against its published public point."""
    fields = vector["Private"]
    key = ec.derive_private_key(base62_int(fields["PD"]), curve(vector))
    numbers = key.public_key().public_numbers()
    if (numbers.x, numbers.y) != (base62_int(fields["PX"]), base62_int(fields["PY"])):
        raise ValueError("vector private scalar does not match its public point")
    return key


def public_key(vector: dict) -> ec.EllipticCurvePublicKey:
    """The vector's `Public` point."""
    fields = vector["Public"]
    x, y = base62_int(fields["PX"]), base62_int(fields["PY"])
    return ec.EllipticCurvePublicNumbers(x, y, curve(vector)).public_key()
