"""Certs-only PKCS#7: round trips through our reader and the openssl command line."""

from __future__ import annotations

import uuid

import pytest
from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certfleet.pki import profiles
from certfleet.pki.errors import PkiError
from certfleet.pki.keys import cert_sha256, generate_private_key
from certfleet.pki.pkcs7 import Pkcs7Error, certs_only, load_certs_only
from certfleet.pki.signer import FileSigner
from tests.pki_checks import openssl

FACTORY = "acme"


@pytest.fixture(scope="module")
def chain() -> list[x509.Certificate]:
    """Root, online device CA and a device certificate, as /cacerts and enroll return them."""
    root_signer = FileSigner(generate_private_key())
    root = root_signer.sign_certificate(profiles.root_ca(FACTORY, root_signer.public_key))
    ca_signer = FileSigner(generate_private_key("P-384"))
    ca = root_signer.sign_certificate(
        profiles.device_ca("online-ca", FACTORY, ca_signer.public_key, profiles.Issuer.of(root))
    )
    device_key = generate_private_key()
    device = ca_signer.sign_certificate(
        profiles.device(str(uuid.uuid4()), FACTORY, device_key.public_key(), profiles.Issuer.of(ca))
    )
    return [root, ca, device]


def fingerprints(certs: list[x509.Certificate]) -> list[str]:
    return sorted(cert_sha256(c) for c in certs)


def test_round_trip_one_cert(chain):
    assert load_certs_only(certs_only(chain[:1])) == chain[:1]


def test_round_trip_chain(chain):
    # DER sorts the SET OF certificates, so only membership survives, not order.
    assert fingerprints(load_certs_only(certs_only(chain))) == fingerprints(chain)


def test_openssl_reads_our_pkcs7(tmp_path, chain):
    path = tmp_path / "certs.p7"
    path.write_bytes(certs_only(chain))
    out = openssl("pkcs7", "-inform", "DER", "-in", str(path), "-print_certs")
    printed = x509.load_pem_x509_certificates(out.encode())
    assert fingerprints(printed) == fingerprints(chain)
    assert "Factory-CA" in out and "online-ca" in out


def test_we_read_openssl_pkcs7(tmp_path, chain):
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    (tmp_path / "chain.pem").write_bytes(pem)
    out = tmp_path / "chain.p7"
    openssl(
        "crl2pkcs7",
        "-nocrl",
        "-certfile",
        str(tmp_path / "chain.pem"),
        "-outform",
        "DER",
        "-out",
        str(out),
    )
    assert fingerprints(load_certs_only(out.read_bytes())) == fingerprints(chain)


def test_no_certs_to_send():
    with pytest.raises(Pkcs7Error) as caught:
        certs_only([])
    assert caught.value.code == "no-certs"
    assert "no certificates to put in the PKCS#7" in str(caught.value)


def test_error_is_a_pki_error():
    assert issubclass(Pkcs7Error, PkiError)


@pytest.mark.parametrize(
    "data, code, fragment",
    [
        (b"", "malformed", "not a DER PKCS#7 certs-only structure"),
        (b"\x30\x03\x02\x01\x00", "malformed", "not a DER PKCS#7 certs-only structure"),
        (b"-----BEGIN PKCS7-----\n", "malformed", "PKCS#7 is PEM; expected DER"),
    ],
    ids=["empty", "not-pkcs7", "pem"],
)
def test_load_refuses_malformed(data, code, fragment):
    with pytest.raises(Pkcs7Error) as caught:
        load_certs_only(data)
    assert caught.value.code == code
    assert fragment in str(caught.value)


def test_load_refuses_truncated(chain):
    with pytest.raises(Pkcs7Error) as caught:
        load_certs_only(certs_only(chain)[:-10])
    assert caught.value.code == "malformed"


def test_load_refuses_signed_data_without_certs():
    empty = cms.ContentInfo(
        {
            "content_type": "signed_data",
            "content": cms.SignedData(
                {
                    "version": "v1",
                    "digest_algorithms": [],
                    "encap_content_info": {"content_type": "data"},
                    "signer_infos": [],
                }
            ),
        }
    ).dump()
    with pytest.raises(Pkcs7Error) as caught:
        load_certs_only(empty)
    assert caught.value.code == "no-certs"
    assert "holds no certificates" in str(caught.value)
