"""The factory hierarchy, checked with openssl, with a file root and a SoftHSM2 root."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509

from certfleet.pki import profiles
from certfleet.pki.errors import PkiError
from certfleet.pki.hierarchy import (
    ServerNames,
    new_root_file_signer,
    plan_factory,
    verify_chain,
    write_issued,
)
from certfleet.pki.keys import generate_private_key
from certfleet.pki.pkcs11_signer import Pkcs11Ref, generate_pkcs11_key
from certfleet.pki.pki_dir import PkiDir
from certfleet.pki.signer import FileSigner

from .pki_checks import mode, openssl, text, verify

NAMES = ServerNames(gateway_dns=["gw.example.test"], gateway_ip=["127.0.0.1"])


def _root_signer(kind: str, request):
    if kind == "file":
        return new_root_file_signer()
    token = request.getfixturevalue("softhsm_token")
    ref = Pkcs11Ref(module=token.module, token=token.label, label="factory-root", key_id=b"\x01")
    return generate_pkcs11_key(ref, token.pin), None


@pytest.fixture(params=["file", "softhsm"])
def factory_dir(request, tmp_path):
    signer, key = _root_signer(request.param, request)
    pki = PkiDir(tmp_path / "pki")
    items = plan_factory(pki, "acme", signer, NAMES, root_key=key)
    write_issued(pki, items)
    return pki, request.param


def test_every_certificate_verifies_with_openssl(factory_dir):
    pki, _ = factory_dir
    root = pki.cert_path("root")
    verify(root, root)
    for stem in ("online-ca", "local-ca-1"):
        verify(root, pki.cert_path(stem))
    verify(root, pki.cert_path("gateway-tls"), "sslserver")
    verify(root, pki.cert_path("est-tls"), "sslserver")


def test_root_profile(factory_dir):
    pki, kind = factory_dir
    out = text(pki.cert_path("root"))
    assert "Subject: CN = Factory-CA, OU = acme" in out
    assert "CA:TRUE" in out and "pathlen" not in out
    assert "Certificate Sign, CRL Sign" in out
    assert "Subject Key Identifier" in out
    cert = pki.read_cert("root")
    years = (cert.not_valid_after_utc - cert.not_valid_before_utc).days / 365
    assert 19.9 < years < 20.1
    assert cert.signature_hash_algorithm.name == "sha256"
    assert pki.key_path("root").exists() == (kind == "file")


@pytest.mark.parametrize("stem", ["online-ca", "local-ca-1"])
def test_device_ca_profile(factory_dir, stem):
    pki, _ = factory_dir
    out = text(pki.cert_path(stem))
    assert "CA:TRUE, pathlen:0" in out
    assert "Certificate Sign" in out
    assert "Issuer: CN = Factory-CA, OU = acme" in out
    assert "Authority Key Identifier" in out


def test_gateway_tls_profile(factory_dir):
    pki, _ = factory_dir
    out = text(pki.cert_path("gateway-tls"))
    assert "TLS Web Server Authentication" in out
    assert "Digital Signature" in out and "Certificate Sign" not in out
    assert "DNS:gw.example.test" in out and "IP Address:127.0.0.1" in out
    assert "CA:FALSE" in out


def test_est_tls_defaults_to_gateway_names(factory_dir):
    pki, _ = factory_dir
    out = text(pki.cert_path("est-tls"))
    assert "DNS:gw.example.test" in out and "TLS Web Server Authentication" in out


def test_file_permissions(factory_dir):
    pki, _ = factory_dir
    keys = sorted(pki.path.glob("*.key"))
    assert keys, "server keys must be written"
    assert all(mode(k) == 0o400 for k in keys)
    assert all(mode(c) == 0o444 for c in pki.path.glob("*.crt"))
    assert mode(pki.path) == 0o700


def test_key_files_match_certificates(factory_dir):
    pki, _ = factory_dir
    for stem in ("online-ca", "gateway-tls"):
        from_key = openssl("pkey", "-in", str(pki.key_path(stem)), "-pubout")
        from_cert = openssl("x509", "-in", str(pki.cert_path(stem)), "-noout", "-pubkey")
        assert from_key == from_cert


def test_refuses_to_overwrite_an_existing_factory(tmp_path):
    pki = PkiDir(tmp_path / "pki")
    signer, key = new_root_file_signer()
    write_issued(pki, plan_factory(pki, "acme", signer, NAMES, root_key=key))
    before = {p.name: p.read_bytes() for p in pki.path.iterdir()}
    signer2, key2 = new_root_file_signer()
    items = plan_factory(pki, "acme", signer2, NAMES, root_key=key2)
    items[1].stem = "local-ca-1"  # collide on purpose
    with pytest.raises(PkiError, match="already exists"):
        write_issued(pki, items)
    assert {p.name: p.read_bytes() for p in pki.path.iterdir()} == before


def test_p384_hierarchy_uses_sha384(tmp_path):
    pki = PkiDir(tmp_path / "pki")
    signer, key = new_root_file_signer("P-384")
    write_issued(pki, plan_factory(pki, "acme", signer, NAMES, curve="P-384", root_key=key))
    assert "ecdsa-with-SHA384" in text(pki.cert_path("online-ca"))
    assert "secp384r1" in text(pki.cert_path("online-ca"))
    verify(pki.cert_path("root"), pki.cert_path("online-ca"))


def test_names_are_required():
    with pytest.raises(PkiError, match="--gateway-dns"):
        ServerNames()


def test_device_cert_never_outlives_its_ca():
    ca_key = generate_private_key()
    now = dt.datetime.now(dt.UTC)
    issuer = profiles.Issuer(
        profiles.name("CA", "acme"), ca_key.public_key(), now + dt.timedelta(days=10)
    )
    builder = profiles.device("uuid-1", "acme", generate_private_key().public_key(), issuer)
    cert = FileSigner(ca_key).sign_certificate(builder)
    assert cert.not_valid_after_utc == issuer.not_after.replace(microsecond=0)
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)


def test_expired_ca_cannot_issue():
    issuer = profiles.Issuer(
        profiles.name("CA", "acme"),
        generate_private_key().public_key(),
        dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
    )
    with pytest.raises(PkiError, match="expired"):
        profiles.device("u", "acme", generate_private_key().public_key(), issuer)


def test_verify_chain_refuses_foreign_certificate(tmp_path):
    pki = PkiDir(tmp_path / "a")
    signer, key = new_root_file_signer()
    items = plan_factory(pki, "acme", signer, NAMES, root_key=key)
    other_signer, other_key = new_root_file_signer()
    other = plan_factory(PkiDir(tmp_path / "b"), "evil", other_signer, NAMES, root_key=other_key)
    verify_chain(items[1].cert, items[0].cert)
    with pytest.raises(PkiError, match="factory root"):
        verify_chain(other[1].cert, items[0].cert)
