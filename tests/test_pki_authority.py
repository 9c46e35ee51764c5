"""Device certificates from CSRs: checks and profile."""

from __future__ import annotations

import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certfleet.pki import profiles
from certfleet.pki.authority import issue_device_certificate
from certfleet.pki.csr import CsrError
from certfleet.pki.keys import generate_private_key
from certfleet.pki.signer import FileSigner


@pytest.fixture
def ca():
    key = generate_private_key()
    signer = FileSigner(key)
    cert = signer.sign_certificate(profiles.root_ca("acme", key.public_key()))
    return cert, signer


def _csr(cn: str, key=None):
    key = key or generate_private_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())


def test_issues_device_profile(ca):
    cert_ca, signer = ca
    device = str(uuid.uuid4())
    cert = issue_device_certificate(_csr(device), cert_ca, signer, "acme")
    cert.verify_directly_issued_by(cert_ca)
    assert cert.subject.rfc4514_string() == f"OU=acme,CN={device}"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_refuses_non_uuid_subject(ca):
    with pytest.raises(CsrError, match="not a device uuid"):
        issue_device_certificate(_csr("laptop"), *ca, "acme")


def test_refuses_rsa_key(ca):
    from cryptography.hazmat.primitives.asymmetric import rsa

    with pytest.raises(CsrError, match="RSA"):
        issue_device_certificate(
            _csr(str(uuid.uuid4()), rsa.generate_private_key(65537, 2048)), *ca, "acme"
        )
