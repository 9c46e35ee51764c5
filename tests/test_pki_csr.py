"""CSR parsing and the checks made before signing: real keys, real CSRs, every refusal."""

from __future__ import annotations

import subprocess
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import AttributeOID, NameOID

from certfleet.pki import profiles
from certfleet.pki.csr import (
    CsrError,
    check_csr_signature,
    check_enroll_subject,
    check_key,
    check_reenroll,
    check_signature_algorithm,
    check_tls_unique,
    csr_challenge_password,
    csr_tls_unique,
    load_csr,
    load_csr_pem_or_der,
    name_text,
    tls_unique_password,
)
from certfleet.pki.errors import PkiError
from certfleet.pki.keys import generate_private_key, private_key_pem
from certfleet.pki.signer import FileSigner

FACTORY = "acme"
DEVICE = str(uuid.UUID(int=7))
TLS_UNIQUE = bytes(range(12))  # a TLS 1.2 Finished verify_data is 12 bytes
SANS = [x509.DNSName("dev7.acme.test"), x509.UniformResourceIdentifier("urn:dev:7")]


def make_csr(
    key,
    subject: x509.Name | None = None,
    sans: list[x509.GeneralName] | None = None,
    algorithm: hashes.HashAlgorithm | None = None,
    password: bytes | None = None,
) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        subject or profiles.name(DEVICE, FACTORY)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if password is not None:
        builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, password)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return builder.sign(key, None)
    return builder.sign(key, algorithm or hashes.SHA256())


def der(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.DER)


def refused(code: str, fragment: str, check, *args, **kwargs) -> CsrError:
    with pytest.raises(CsrError) as caught:
        check(*args, **kwargs)
    assert caught.value.code == code
    assert fragment in str(caught.value)
    return caught.value


@pytest.fixture(scope="module")
def ca():
    signer = FileSigner(generate_private_key())
    return signer, signer.sign_certificate(profiles.root_ca(FACTORY, signer.public_key))


@pytest.fixture(scope="module")
def device_key():
    return generate_private_key()


def issue(ca, key, sans=None) -> x509.Certificate:
    signer, ca_cert = ca
    builder = profiles.device(
        DEVICE, FACTORY, key.public_key(), profiles.Issuer.of(ca_cert), sans=sans
    )
    return signer.sign_certificate(builder)


@pytest.fixture(scope="module")
def current(ca, device_key):
    return issue(ca, device_key)


# --- loading ---------------------------------------------------------------


def test_load_der_round_trip(device_key):
    csr = make_csr(device_key)
    assert load_csr(der(csr)) == csr


def test_load_pem_or_der_accepts_both(device_key):
    csr = make_csr(device_key)
    assert load_csr_pem_or_der(der(csr)) == csr
    pem = csr.public_bytes(serialization.Encoding.PEM)
    assert load_csr_pem_or_der(b"\r\n" + pem) == csr


def test_error_is_a_pki_error():
    assert issubclass(CsrError, PkiError)


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"", "CSR is empty"),
        (b"junk", "CSR is not valid DER PKCS#10: "),
        (b"\x30\x03\x02\x01\x00", "CSR is not valid DER PKCS#10: "),
    ],
)
def test_load_refuses_malformed_der(data, fragment):
    refused("malformed", fragment, load_csr, data)


def test_load_refuses_truncated_der(device_key):
    refused("malformed", "not valid DER PKCS#10", load_csr, der(make_csr(device_key))[:-3])


def test_load_der_refuses_pem(device_key):
    pem = make_csr(device_key).public_bytes(serialization.Encoding.PEM)
    refused("malformed", "not valid DER PKCS#10", load_csr, pem)


def test_load_refuses_broken_pem():
    data = b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
    refused("malformed", "CSR is not valid PEM PKCS#10", load_csr_pem_or_der, data)


# --- signature ---------------------------------------------------------------


def test_signature_verifies(device_key):
    check_csr_signature(load_csr(der(make_csr(device_key))))


def test_flipped_signature_byte_fails(device_key):
    csr = make_csr(device_key)
    data = bytearray(der(csr))
    start = bytes(data).rindex(csr.signature)
    # The last byte of s: the ECDSA-Sig-Value stays well-formed DER, only its value changes.
    data[start + len(csr.signature) - 1] ^= 0x01
    tampered = load_csr(bytes(data))
    refused(
        "bad-signature",
        "CSR signature does not verify: the request was altered or signed with another key",
        check_csr_signature,
        tampered,
    )


def test_altered_subject_fails(device_key):
    data = der(make_csr(device_key))
    altered = data.replace(FACTORY.encode(), b"evil")
    assert altered != data
    refused("bad-signature", "does not verify", check_csr_signature, load_csr(altered))


# --- key type and signature algorithm -----------------------------------------


@pytest.mark.parametrize("curve", ["P-256", "P-384"])
@pytest.mark.parametrize("algorithm", [hashes.SHA256(), hashes.SHA384(), hashes.SHA512()])
def test_key_accepts_p256_p384_with_any_sha2(curve, algorithm):
    key = generate_private_key(curve)
    csr = make_csr(key, algorithm=algorithm)
    assert check_key(csr).public_numbers() == key.public_key().public_numbers()


@pytest.mark.parametrize(
    "key, fragment",
    [
        (rsa.generate_private_key(65537, 2048), "unsupported key type RSA"),
        (ec.generate_private_key(ec.SECP521R1()), "unsupported curve secp521r1"),
        (ed25519.Ed25519PrivateKey.generate(), "unsupported key type Ed25519"),
    ],
    ids=["rsa", "p521", "ed25519"],
)
def test_key_refuses_other_types(key, fragment):
    err = refused("bad-key-type", fragment, check_key, make_csr(key))
    assert str(err).startswith("CSR key refused: ")


def test_key_refuses_weak_hash(device_key):
    csr = make_csr(device_key, algorithm=hashes.SHA224())
    message = "CSR is signed with ecdsa-with-SHA224; sign it with ECDSA and SHA-256"
    refused("bad-signature-algorithm", message, check_key, csr)
    refused("bad-signature-algorithm", message, check_signature_algorithm, csr)


# --- re-enrollment (RFC 7030 §4.2.2) --------------------------------------------


def test_reenroll_with_new_key_passes(current):
    check_reenroll(make_csr(generate_private_key()), current)


def test_reenroll_refuses_other_cn(current):
    csr = make_csr(generate_private_key(), subject=profiles.name("other", FACTORY))
    refused(
        "subject-mismatch",
        f"CSR subject CN=other,OU={FACTORY} differs from the current certificate's "
        f"CN={DEVICE},OU={FACTORY}",
        check_reenroll,
        csr,
        current,
    )


def test_reenroll_refuses_reordered_subject(current):
    subject = x509.Name(list(reversed(list(profiles.name(DEVICE, FACTORY)))))
    csr = make_csr(generate_private_key(), subject=subject)
    refused(
        "subject-mismatch",
        f"CSR subject OU={FACTORY},CN={DEVICE} differs",
        check_reenroll,
        csr,
        current,
    )


def test_reenroll_refuses_same_text_other_encoding(current):
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, DEVICE, _type=_ASN1Type.PrintableString),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, FACTORY),
        ]
    )
    assert name_text(subject) == name_text(current.subject)
    csr = make_csr(generate_private_key(), subject=subject)
    refused("subject-mismatch", "string types differ", check_reenroll, csr, current)


def test_reenroll_san_equal_as_a_set(ca, device_key):
    current = issue(ca, device_key, sans=SANS)
    check_reenroll(make_csr(generate_private_key(), sans=list(reversed(SANS))), current)


@pytest.mark.parametrize(
    "current_sans, csr_sans, fragment",
    [
        (SANS, None, "CSR SubjectAltName (none) differs from the current certificate's ("),
        (
            None,
            SANS[:1],
            "CSR SubjectAltName (DNS:dev7.acme.test) differs from the current certificate's (none)",
        ),
        (SANS, SANS[:1], "current certificate's (DNS:dev7.acme.test, URI:urn:dev:7)"),
        (SANS[:1], [x509.DNSName("other.acme.test")], "(DNS:other.acme.test) differs"),
    ],
    ids=["dropped", "added", "fewer", "other"],
)
def test_reenroll_refuses_other_san(ca, device_key, current_sans, csr_sans, fragment):
    current = issue(ca, device_key, sans=current_sans)
    csr = make_csr(generate_private_key(), sans=csr_sans)
    refused("san-mismatch", fragment, check_reenroll, csr, current)


def test_reenroll_refuses_same_key(current, device_key):
    refused(
        "same-key",
        "CSR reuses the current certificate's key",
        check_reenroll,
        make_csr(device_key),
        current,
    )


def test_reenroll_same_key_when_allowed(current, device_key):
    check_reenroll(make_csr(device_key), current, allow_same_key=True)


# --- bootstrap enrollment bound to one device id -----------------------------------


def test_enroll_subject_matches_bound_id(device_key):
    check_enroll_subject(make_csr(device_key), DEVICE)


@pytest.mark.parametrize(
    "subject",
    [
        profiles.name("someone-else", FACTORY),
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, FACTORY)]),
        x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, DEVICE),
                x509.NameAttribute(NameOID.COMMON_NAME, "second"),
            ]
        ),
    ],
    ids=["other-cn", "no-cn", "two-cns"],
)
def test_enroll_subject_refuses_others(device_key, subject):
    err = refused(
        "subject-mismatch",
        f"does not match this credential, which may only enroll CN={DEVICE}",
        check_enroll_subject,
        make_csr(device_key, subject=subject),
        DEVICE,
    )
    assert str(err).startswith(f"CSR subject {name_text(subject)} ")


# --- tls-unique in challengePassword (RFC 7030 §3.5) ----------------------------------


def test_challenge_password_absent(device_key):
    csr = make_csr(device_key)
    assert csr_challenge_password(csr) is None
    assert csr_tls_unique(csr) is None


def test_tls_unique_round_trip(device_key):
    password = tls_unique_password(TLS_UNIQUE)
    assert password == "AAECAwQFBgcICQoL"
    csr = load_csr(der(make_csr(device_key, password=password.encode())))
    assert csr_challenge_password(csr) == password.encode()
    assert csr_tls_unique(csr) == TLS_UNIQUE
    check_tls_unique(csr, TLS_UNIQUE)


def test_tls_unique_mismatch(device_key):
    csr = make_csr(device_key, password=tls_unique_password(TLS_UNIQUE).encode())
    refused(
        "tls-unique-mismatch",
        "does not match this connection's tls-unique value",
        check_tls_unique,
        csr,
        bytes(12),
    )


def test_tls_unique_missing(device_key):
    refused(
        "tls-unique-missing",
        "CSR has no challengePassword",
        check_tls_unique,
        make_csr(device_key),
        TLS_UNIQUE,
    )


@pytest.mark.parametrize("password", [b"not base64!", b"AAECAwQ", b"===="])
def test_tls_unique_malformed(device_key, password):
    csr = make_csr(device_key, password=password)
    refused("tls-unique-malformed", "not base64", check_tls_unique, csr, TLS_UNIQUE)


def test_tls_unique_unavailable_on_connection(device_key):
    csr = make_csr(device_key, password=tls_unique_password(TLS_UNIQUE).encode())
    refused("tls-unique-unavailable", "connect with TLS 1.2", check_tls_unique, csr, b"")


def test_openssl_made_csr_passes_all_checks(tmp_path, device_key):
    """A CSR from the openssl command line, challengePassword as PrintableString."""
    (tmp_path / "key.pem").write_bytes(private_key_pem(device_key))
    (tmp_path / "req.cnf").write_text(
        "[req]\nprompt = no\ndistinguished_name = dn\nattributes = attrs\n"
        f"[dn]\nCN = {DEVICE}\nOU = {FACTORY}\n"
        f"[attrs]\nchallengePassword = {tls_unique_password(TLS_UNIQUE)}\n"
    )
    subprocess.run(
        ["openssl", "req", "-new", "-key", "key.pem", "-config", "req.cnf", "-out", "req.pem"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    csr = load_csr_pem_or_der((tmp_path / "req.pem").read_bytes())
    check_csr_signature(csr)
    check_key(csr)
    check_enroll_subject(csr, DEVICE)
    check_tls_unique(csr, TLS_UNIQUE)
