"""SHA-256 fingerprints as people type them: the parser the gateway and the CLI share."""

from __future__ import annotations

import pytest

from certfleet.pki.keys import generate_private_key, pubkey_sha256, sha256_hex

HEX = "ab" * 32


@pytest.mark.parametrize(
    "typed",
    [HEX, HEX.upper(), f"  {HEX}\n", ":".join(HEX[i : i + 2] for i in range(0, 64, 2)).upper()],
)
def test_typed_forms_become_lower_case_hex(typed: str):
    assert sha256_hex(typed) == HEX


@pytest.mark.parametrize(
    "typed", ["", "abc", HEX[:-1], HEX + "0", "g" * 64, "é" * 64, "٣" * 64, HEX[:62] + " 0"]
)
def test_anything_else_is_refused(typed: str):
    assert sha256_hex(typed) is None


def test_a_key_fingerprint_is_its_own_form():
    fingerprint = pubkey_sha256(generate_private_key().public_key())
    assert sha256_hex(fingerprint) == fingerprint
