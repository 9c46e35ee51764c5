"""ECIES (go-ecies wire format): interop vectors, round trips and failure modes."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from hypothesis import given, settings
from hypothesis import strategies as st

from certfleet.pki import ecies
from certfleet.pki.ecies import EciesError
from tests import ecies_vectors as vectors

try:
    ENC_VECTORS = vectors.load("encrypt-decrypt.json")
    SHARED_VECTORS = vectors.load("gen-shared.json")
    MISSING = ""
except FileNotFoundError as exc:
    ENC_VECTORS, SHARED_VECTORS, MISSING = {}, {}, str(exc)

CURVES = [ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1()]
KEYS = {c.name: ec.generate_private_key(c) for c in CURVES}
OTHER_KEYS = {c.name: ec.generate_private_key(c) for c in CURVES}
# R, IV and T lengths per curve, to name the region a tampered byte falls in.
LAYOUT = {"secp256r1": (65, 16, 32), "secp384r1": (97, 16, 48), "secp521r1": (133, 16, 64)}
SUPPORTED = "P-256, P-384 or P-521"

curve_names = pytest.mark.parametrize("name", sorted(KEYS))


def region(name: str, index: int, total: int) -> str:
    r_len, iv_len, tag_len = LAYOUT[name]
    if index < r_len:
        return "R"
    if index < r_len + iv_len:
        return "IV"
    return "T" if index >= total - tag_len else "C"


def test_vector_files_present():
    assert not MISSING, MISSING
    assert len(ENC_VECTORS) == 60
    assert len(SHARED_VECTORS) == 9


def test_base62_matches_go_digit_order():
    assert vectors.base62_int("0") == 0
    assert vectors.base62_int("z") == 35
    assert vectors.base62_int("A") == 36
    assert vectors.base62_int("Z") == 61
    assert vectors.base62_int("10") == 62
    with pytest.raises(ValueError):
        vectors.base62_int("1-2")


@pytest.mark.parametrize("vector_name", sorted(ENC_VECTORS))
def test_decrypts_go_vector(vector_name):
    vector = ENC_VECTORS[vector_name]
    key = vectors.private_key(vector)
    ciphertext = bytes.fromhex(vector["Message"]["Enc"])
    assert ecies.decrypt_with_key(key, ciphertext).hex() == vector["Message"]["Dec"]


@pytest.mark.parametrize("vector_name", sorted(SHARED_VECTORS))
def test_shared_secret_matches_go_vector(vector_name):
    # go-ecies GenerateShared returns the zero-padded x-coordinate Z, before the KDF.
    vector = SHARED_VECTORS[vector_name]
    exchange = ecies.key_exchange(vectors.private_key(vector))
    shared = ecies.shared_secret(exchange, vectors.curve(vector), vectors.public_key(vector))
    assert shared.hex() == vector["Shared"]


def test_shared_secret_pads_stripped_exchange_output():
    if MISSING:
        pytest.fail(MISSING)
    zeropad = {k: v for k, v in SHARED_VECTORS.items() if "zeropad" in k}
    assert len(zeropad) == 3
    for vector in zeropad.values():
        real = ecies.key_exchange(vectors.private_key(vector))
        stripped = lambda peer, real=real: real(peer).lstrip(b"\0")  # noqa: E731
        shared = ecies.shared_secret(stripped, vectors.curve(vector), vectors.public_key(vector))
        assert shared.hex() == vector["Shared"]


@pytest.mark.parametrize("bad", [b"", b"\1" * 33, "not bytes", None])
def test_shared_secret_rejects_bad_exchange_output(bad):
    peer = KEYS["secp256r1"].public_key()
    with pytest.raises(EciesError, match="ECDH for P-256 must return 1 to 32 bytes"):
        ecies.shared_secret(lambda _: bad, ec.SECP256R1(), peer)


@pytest.mark.parametrize(
    ("curve", "aes_len", "mac_len"),
    [(ec.SECP256R1(), 16, 32), (ec.SECP384R1(), 24, 48), (ec.SECP521R1(), 32, 64)],
)
def test_derive_keys_sizes(curve, aes_len, mac_len):
    aes_key, mac_key = ecies.derive_keys(curve, b"\x07" * 32)
    assert (len(aes_key), len(mac_key)) == (aes_len, mac_len)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(KEYS)), plaintext=st.binary(max_size=300))
def test_round_trip(name, plaintext):
    key = KEYS[name]
    ciphertext = ecies.encrypt(key.public_key(), plaintext)
    r_len, iv_len, tag_len = LAYOUT[name]
    assert len(ciphertext) == r_len + iv_len + len(plaintext) + tag_len
    assert ciphertext[0] == 4
    assert ecies.decrypt_with_key(key, ciphertext) == plaintext


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(sorted(KEYS)), plaintext=st.binary(max_size=300))
def test_round_trip_b64(name, plaintext):
    key = KEYS[name]
    text = ecies.encrypt_b64(key.public_key(), plaintext)
    exchange = ecies.key_exchange(key)
    assert ecies.decrypt_b64(exchange, key.curve, f"  {text}\n") == plaintext


def test_encryption_is_randomized():
    public = KEYS["secp256r1"].public_key()
    first, second = ecies.encrypt(public, b"same"), ecies.encrypt(public, b"same")
    assert first[:65] != second[:65]
    assert first[65:81] != second[65:81]


def test_decrypt_through_exchange_callable():
    key = KEYS["secp384r1"]
    ciphertext = ecies.encrypt(key.public_key(), b"wifi-psk=hunter2")
    seen = []

    def exchange(peer: ec.EllipticCurvePublicKey) -> bytes:
        seen.append(peer)
        return key.exchange(ec.ECDH(), peer)

    assert ecies.decrypt(exchange, ec.SECP384R1(), ciphertext) == b"wifi-psk=hunter2"
    assert len(seen) == 1
    assert seen[0] == ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), ciphertext[:97])


def test_go_vector_through_exchange_callable_and_b64():
    if MISSING:
        pytest.fail(MISSING)
    vector = ENC_VECTORS["gen-encrypt-decrypt-10"]
    key = vectors.private_key(vector)
    text = base64.b64encode(bytes.fromhex(vector["Message"]["Enc"])).decode()
    exchange = lambda peer: key.exchange(ec.ECDH(), peer)  # noqa: E731
    assert ecies.decrypt_b64(exchange, key.curve, text).hex() == vector["Message"]["Dec"]


@curve_names
def test_empty_plaintext_is_a_normal_ciphertext(name):
    key = KEYS[name]
    ciphertext = ecies.encrypt(key.public_key(), b"")
    assert len(ciphertext) == sum(LAYOUT[name])
    assert ecies.decrypt_with_key(key, ciphertext) == b""
    tampered = ciphertext[:-1] + bytes([ciphertext[-1] ^ 1])
    with pytest.raises(EciesError, match="authentication failed"):
        ecies.decrypt_with_key(key, tampered)


def test_empty_ciphertext_is_rejected():
    key = KEYS["secp256r1"]
    with pytest.raises(EciesError, match="empty ciphertext"):
        ecies.decrypt_with_key(key, b"")
    with pytest.raises(EciesError, match="empty ciphertext"):
        ecies.decrypt_b64(ecies.key_exchange(key), key.curve, "")


@curve_names
def test_tampering_any_byte_fails(name):
    key = KEYS[name]
    ciphertext = ecies.encrypt(key.public_key(), b"config value 0123")
    hit = set()
    for index in range(len(ciphertext)):
        for flip in (0x01, 0x80):
            tampered = bytearray(ciphertext)
            tampered[index] ^= flip
            where = region(name, index, len(ciphertext))
            with pytest.raises(EciesError):
                ecies.decrypt_with_key(key, bytes(tampered))
            hit.add(where)
    assert hit == {"R", "IV", "C", "T"}


@curve_names
def test_appended_byte_fails(name):
    key = KEYS[name]
    ciphertext = ecies.encrypt(key.public_key(), b"abc")
    with pytest.raises(EciesError, match="authentication failed"):
        ecies.decrypt_with_key(key, ciphertext + b"\0")


@curve_names
def test_truncation_fails(name):
    key = KEYS[name]
    ciphertext = ecies.encrypt(key.public_key(), b"0123456789")
    for length in range(len(ciphertext)):
        with pytest.raises(EciesError):
            ecies.decrypt_with_key(key, ciphertext[:length])


def test_too_short_message():
    key = KEYS["secp256r1"]
    expected = r"^ciphertext too short for P-256 \(got 40 bytes, need at least 113\)$"
    with pytest.raises(EciesError, match=expected):
        ecies.decrypt_with_key(key, b"\4" * 40)


@curve_names
def test_wrong_key_fails(name):
    ciphertext = ecies.encrypt(KEYS[name].public_key(), b"secret")
    expected = "^ciphertext authentication failed: wrong key or corrupted data$"
    with pytest.raises(EciesError, match=expected):
        ecies.decrypt_with_key(OTHER_KEYS[name], ciphertext)


def test_wrong_curve_fails():
    ciphertext = ecies.encrypt(KEYS["secp384r1"].public_key(), b"secret" * 10)
    with pytest.raises(EciesError):
        ecies.decrypt_with_key(KEYS["secp256r1"], ciphertext)
    with pytest.raises(EciesError):
        ecies.decrypt_with_key(KEYS["secp521r1"], ciphertext)


def test_point_not_on_curve_fails():
    key = KEYS["secp256r1"]
    ciphertext = bytearray(ecies.encrypt(key.public_key(), b"secret"))
    ciphertext[1:65] = b"\1" * 64
    with pytest.raises(EciesError, match="not a point on P-256"):
        ecies.decrypt_with_key(key, bytes(ciphertext))


def test_compressed_point_rejected():
    key = KEYS["secp256r1"]
    ciphertext = bytearray(ecies.encrypt(key.public_key(), b"secret"))
    ciphertext[0] = 2
    with pytest.raises(EciesError, match="uncompressed P-256 point"):
        ecies.decrypt_with_key(key, bytes(ciphertext))


def test_invalid_base64_rejected():
    key = KEYS["secp256r1"]
    with pytest.raises(EciesError, match="not valid base64"):
        ecies.decrypt_b64(ecies.key_exchange(key), key.curve, "not*base64!")


@pytest.mark.parametrize(
    ("make_key", "label"),
    [
        (lambda: ed25519.Ed25519PrivateKey.generate().public_key(), "Ed25519PublicKey"),
        (lambda: x25519.X25519PrivateKey.generate().public_key(), "X25519PublicKey"),
        (lambda: rsa.generate_private_key(65537, 2048).public_key(), "RSAPublicKey"),
        (lambda: ec.generate_private_key(ec.SECP256K1()).public_key(), "EC key on secp256k1"),
        (lambda: ec.generate_private_key(ec.SECP224R1()).public_key(), "EC key on secp224r1"),
        (lambda: KEYS["secp256r1"], "ECPrivateKey"),
    ],
)
def test_encrypt_rejects_unsupported_keys(make_key, label):
    with pytest.raises(EciesError, match=f"unsupported key type {label}: .*{SUPPORTED}$"):
        ecies.encrypt(make_key(), b"x")


def test_decrypt_rejects_unsupported_keys_and_curves():
    with pytest.raises(EciesError, match=f"unsupported key type Ed25519PrivateKey: .*{SUPPORTED}"):
        ecies.decrypt_with_key(ed25519.Ed25519PrivateKey.generate(), b"\4" * 200)
    k1 = ec.generate_private_key(ec.SECP256K1())
    with pytest.raises(EciesError, match=f"EC key on secp256k1: .*{SUPPORTED}"):
        ecies.decrypt_with_key(k1, b"\4" * 200)
    with pytest.raises(EciesError, match=f"unsupported curve secp256k1: .*{SUPPORTED}"):
        ecies.decrypt(ecies.key_exchange(KEYS["secp256r1"]), ec.SECP256K1(), b"\4" * 200)


def test_error_is_a_value_error():
    assert issubclass(EciesError, ValueError)
