"""File and PKCS#11 signers sign, verify and derive identically."""

from __future__ import annotations

import datetime as dt
import os
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certfleet.pki.errors import PkiError
from certfleet.pki.files import write_atomic
from certfleet.pki.keys import generate_private_key, private_key_pem
from certfleet.pki.pkcs11_signer import (
    Pkcs11Ref,
    Pkcs11Signer,
    generate_pkcs11_key,
    parse_hex_id,
)
from certfleet.pki.signer import FileSigner, load_file_signer

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _builder(public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "signer test")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(0x1234)
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )


def _crl_builder() -> x509.CertificateRevocationListBuilder:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "signer test")])
    revoked = x509.RevokedCertificateBuilder().serial_number(7).revocation_date(NOW).build()
    return (
        x509.CertificateRevocationListBuilder()
        .issuer_name(name)
        .last_update(NOW)
        .next_update(NOW + dt.timedelta(days=7))
        .add_revoked_certificate(revoked)
    )


def _hsm_ref(token, label: str = "ca") -> Pkcs11Ref:
    return Pkcs11Ref(module=token.module, token=token.label, label=label, key_id=b"\x01")


@pytest.mark.parametrize("curve", ["P-256", "P-384"])
def test_hsm_and_file_certificates_are_identical_but_for_signature(softhsm_token, curve):
    hsm = generate_pkcs11_key(_hsm_ref(softhsm_token), softhsm_token.pin, curve)
    builder = _builder(hsm.public_key)
    from_hsm = hsm.sign_certificate(builder)
    from_hsm.verify_directly_issued_by(from_hsm)
    other = FileSigner(generate_private_key(curve))
    from_file = other.sign_certificate(_builder(hsm.public_key))
    assert from_hsm.tbs_certificate_bytes == from_file.tbs_certificate_bytes
    assert from_hsm.signature_hash_algorithm.name == ("sha384" if curve == "P-384" else "sha256")


def test_hsm_signs_crl(softhsm_token):
    hsm = generate_pkcs11_key(_hsm_ref(softhsm_token), softhsm_token.pin)
    crl = hsm.sign_crl(_crl_builder())
    assert crl.is_signature_valid(hsm.public_key)
    assert crl.get_revoked_certificate_by_serial_number(7) is not None


def test_file_signer_signs_crl():
    signer = FileSigner(generate_private_key())
    crl = signer.sign_crl(_crl_builder())
    assert crl.is_signature_valid(signer.public_key)
    assert not crl.is_signature_valid(generate_private_key().public_key())


def test_hsm_ecdh_matches_software(softhsm_token):
    hsm = generate_pkcs11_key(_hsm_ref(softhsm_token), softhsm_token.pin)
    peer = generate_private_key()
    assert hsm.exchange(peer.public_key()) == peer.exchange(ec.ECDH(), hsm.public_key)


def test_hsm_key_reopens_by_uri_and_is_not_extractable(softhsm_token):
    created = generate_pkcs11_key(_hsm_ref(softhsm_token), softhsm_token.pin)
    reopened = Pkcs11Signer(Pkcs11Ref.parse(created.key_ref), softhsm_token.pin)
    assert reopened.public_key.public_numbers() == created.public_key.public_numbers()
    from pkcs11 import Attribute

    assert reopened._private[Attribute.EXTRACTABLE] is False
    assert reopened._private[Attribute.SENSITIVE] is True


def test_hsm_wrong_pin_is_a_clear_error(softhsm_token):
    generate_pkcs11_key(_hsm_ref(softhsm_token), softhsm_token.pin)
    with pytest.raises(PkiError, match="wrong PIN"):
        Pkcs11Signer(_hsm_ref(softhsm_token), "0000")


def test_hsm_missing_token_and_key_are_clear_errors(softhsm_token):
    missing_token = Pkcs11Ref(module=softhsm_token.module, token="no-such", label="ca")
    with pytest.raises(PkiError, match="no PKCS#11 token labelled 'no-such'"):
        Pkcs11Signer(missing_token, "1234")
    with pytest.raises(PkiError, match="no EC key label 'absent'"):
        Pkcs11Signer(_hsm_ref(softhsm_token, "absent"), softhsm_token.pin)


def test_hsm_refuses_to_overwrite_a_key(softhsm_token):
    generate_pkcs11_key(_hsm_ref(softhsm_token), softhsm_token.pin)
    with pytest.raises(PkiError, match="already holds"):
        generate_pkcs11_key(_hsm_ref(softhsm_token), softhsm_token.pin)


def test_missing_module_is_a_clear_error():
    ref = Pkcs11Ref(module="/nonexistent/libpkcs11.so", token="t", label="k")
    with pytest.raises(PkiError, match="does not exist"):
        Pkcs11Signer(ref, "1234")


def test_pin_comes_from_environment_or_file(softhsm_token, tmp_path, monkeypatch):
    generate_pkcs11_key(_hsm_ref(softhsm_token), softhsm_token.pin)
    monkeypatch.setenv("CERTFLEET_HSM_PIN", softhsm_token.pin)
    assert Pkcs11Signer(_hsm_ref(softhsm_token)).public_key is not None
    monkeypatch.delenv("CERTFLEET_HSM_PIN")
    pin_file = tmp_path / "pin"
    pin_file.write_text(softhsm_token.pin + "\n")
    ref = Pkcs11Ref.parse(_hsm_ref(softhsm_token).uri() + f"&pin-source=file:{pin_file}")
    assert Pkcs11Signer(ref).public_key is not None
    with pytest.raises(PkiError, match="needs a PIN"):
        Pkcs11Signer(_hsm_ref(softhsm_token))


def test_uri_round_trip_keeps_hex_id_and_has_no_pin():
    ref = Pkcs11Ref(module="/usr/lib/m.so", token="my token", label="root", key_id=b"\x0a\x07")
    uri = ref.uri()
    assert "id=%0a%07" in uri and "pin" not in uri.replace("pin-source", "")
    assert Pkcs11Ref.parse(uri) == ref


@pytest.mark.parametrize(
    ("text", "value"), [("01", b"\x01"), ("0x07", b"\x07"), ("a07", b"\x0a\x07")]
)
def test_hex_ids(text, value):
    assert parse_hex_id(text) == value


@pytest.mark.parametrize("text", ["", "zz", "0x"])
def test_bad_hex_ids(text):
    with pytest.raises(PkiError, match="write it in hex"):
        parse_hex_id(text)


def test_file_signer_refuses_readable_key_file(tmp_path):
    path = tmp_path / "ca.key"
    write_atomic(path, private_key_pem(generate_private_key()), mode=0o644)
    with pytest.raises(PkiError, match="chmod 400"):
        load_file_signer(path)
    os.chmod(path, 0o400)
    assert load_file_signer(path).key_ref == f"file:{path}"


def test_file_signer_passphrase(tmp_path):
    path = tmp_path / "ca.key"
    write_atomic(path, private_key_pem(generate_private_key(), b"secret"), mode=0o400)
    with pytest.raises(PkiError, match="encrypted"):
        load_file_signer(path)
    with pytest.raises(PkiError, match="wrong passphrase"):
        load_file_signer(path, b"wrong")
    assert load_file_signer(path, b"secret").public_key is not None


def test_ed25519_key_file_rejected(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    path = tmp_path / "ed.key"
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_atomic(path, pem, mode=0o400)
    with pytest.raises(PkiError, match="unsupported key type Ed25519"):
        load_file_signer(path)


def test_write_atomic_sets_mode_and_leaves_no_temp(tmp_path):
    path = tmp_path / "k"
    write_atomic(path, b"one", mode=0o400)
    write_atomic(path, b"two", mode=0o400)
    assert path.read_bytes() == b"two"
    assert oct(path.stat().st_mode & 0o777) == "0o400"
    assert [p.name for p in tmp_path.iterdir()] == ["k"]


def _csr_builder() -> x509.CertificateSigningRequestBuilder:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device-1")])
    san = x509.SubjectAlternativeName([x509.DNSName("device-1.local")])
    return x509.CertificateSigningRequestBuilder().subject_name(name).add_extension(san, False)


def test_hsm_signs_csr_with_its_own_public_key(softhsm_token, tmp_path):
    hsm = generate_pkcs11_key(_hsm_ref(softhsm_token), softhsm_token.pin)
    csr = hsm.sign_csr(_csr_builder())
    assert csr.is_signature_valid
    assert csr.public_key().public_numbers() == hsm.public_key.public_numbers()
    file_csr = FileSigner(generate_private_key()).sign_csr(_csr_builder())
    assert csr.subject == file_csr.subject
    assert list(csr.extensions) == list(file_csr.extensions)
    path = tmp_path / "hsm.csr"
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    done = subprocess.run(
        ["openssl", "req", "-in", str(path), "-verify", "-noout"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "verify OK" in done.stdout + done.stderr
