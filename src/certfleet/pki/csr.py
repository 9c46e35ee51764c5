"""PKCS#10 requests: parsing and the checks an EST server makes before it signs.

Every refusal is a `CsrError` whose `code` is a short machine string (the HTTP
layer maps it to a 4xx, tests assert on it) and whose message tells the person
behind the device what to change.
"""

from __future__ import annotations

import base64
import binascii
import hmac

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AttributeOID, NameOID, SignatureAlgorithmOID

from .errors import PkiError
from .keys import check_public_key, pubkey_sha256

# The CA's own curve does not matter: any of these is as strong as a device key needs.
SIGNATURE_ALGORITHMS = {
    SignatureAlgorithmOID.ECDSA_WITH_SHA256: "ecdsa-with-SHA256",
    SignatureAlgorithmOID.ECDSA_WITH_SHA384: "ecdsa-with-SHA384",
    SignatureAlgorithmOID.ECDSA_WITH_SHA512: "ecdsa-with-SHA512",
}


class CsrError(PkiError):
    """A CSR was refused; `code` names the reason for machines, the message for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def load_csr(der: bytes) -> x509.CertificateSigningRequest:
    """Parse a DER PKCS#10 request, refusing anything cryptography cannot read fully."""
    if not der:
        raise CsrError("malformed", "CSR is empty: send a DER PKCS#10 request")
    try:
        csr = x509.load_der_x509_csr(der)
    except ValueError as exc:
        raise CsrError("malformed", f"CSR is not valid DER PKCS#10: {exc}") from exc
    return _parsed(csr)


def load_csr_pem_or_der(data: bytes) -> x509.CertificateSigningRequest:
    """Parse a PKCS#10 request given as PEM (-----BEGIN CERTIFICATE REQUEST) or DER."""
    if not data.lstrip().startswith(b"-----BEGIN"):
        return load_csr(data)
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise CsrError("malformed", f"CSR is not valid PEM PKCS#10: {exc}") from exc
    return _parsed(csr)


def _parsed(csr: x509.CertificateSigningRequest) -> x509.CertificateSigningRequest:
    # cryptography parses these parts lazily; fail here, as "malformed", not deep in a check.
    try:
        _ = csr.subject, csr.extensions, csr.attributes
    except ValueError as exc:
        raise CsrError("malformed", f"CSR is not valid DER PKCS#10: {exc}") from exc
    return csr


def check_csr_signature(csr: x509.CertificateSigningRequest) -> None:
    """Refuse a CSR whose self-signature does not verify with its own public key."""
    try:
        valid = csr.is_signature_valid
    except (UnsupportedAlgorithm, ValueError):
        valid = False
    if not valid:
        raise CsrError(
            "bad-signature",
            "CSR signature does not verify: the request was altered or signed with another key",
        )


def check_key(csr: x509.CertificateSigningRequest) -> ec.EllipticCurvePublicKey:
    """Accept only EC P-256/P-384 keys, signed with ECDSA and SHA-256/384/512."""
    try:
        key = check_public_key(_public_key(csr))
    except CsrError:
        raise
    except PkiError as exc:
        raise CsrError("bad-key-type", f"CSR key refused: {exc}") from exc
    check_signature_algorithm(csr)
    return key


def check_signature_algorithm(csr: x509.CertificateSigningRequest) -> None:
    """Refuse CSRs not signed with ECDSA and SHA-256, SHA-384 or SHA-512."""
    oid = csr.signature_algorithm_oid
    if oid not in SIGNATURE_ALGORITHMS:
        used = getattr(oid, "_name", "") or oid.dotted_string
        raise CsrError(
            "bad-signature-algorithm",
            f"CSR is signed with {used}; sign it with ECDSA and SHA-256, SHA-384 or SHA-512",
        )


def _public_key(csr: x509.CertificateSigningRequest) -> object:
    try:
        return csr.public_key()
    except (UnsupportedAlgorithm, ValueError) as exc:
        raise CsrError(
            "bad-key-type",
            f"CSR key refused: unsupported key type ({exc}); certfleet needs EC P-256 or P-384",
        ) from exc


def check_reenroll(
    csr: x509.CertificateSigningRequest,
    current: x509.Certificate,
    allow_same_key: bool = False,
) -> None:
    """RFC 7030 §4.2.2: same subject bytes and SubjectAltName as `current`, and a new key."""
    _check_same_subject(csr.subject, current.subject)
    _check_same_san(_san(csr.extensions), _san(current.extensions))
    if allow_same_key:
        return
    old = current.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    new_key = _public_key(csr)
    new = new_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if new == old:
        raise CsrError(
            "same-key",
            f"CSR reuses the current certificate's key (sha256 {pubkey_sha256(new_key)[:16]}…); "
            "re-enrollment needs a newly generated key pair",
        )


def _check_same_subject(asked: x509.Name, current: x509.Name) -> None:
    if asked.public_bytes() == current.public_bytes():
        return
    asked_text, current_text = name_text(asked), name_text(current)
    if asked_text == current_text:
        raise CsrError(
            "subject-mismatch",
            f"CSR subject {asked_text} has the current certificate's text but not its "
            "encoding (string types differ); copy the subject from the current certificate",
        )
    raise CsrError(
        "subject-mismatch",
        f"CSR subject {asked_text} differs from the current certificate's {current_text}",
    )


def _san(extensions: x509.Extensions) -> frozenset[x509.GeneralName]:
    try:
        ext = extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return frozenset()
    return frozenset(ext.value)


def _check_same_san(asked: frozenset[x509.GeneralName], current: frozenset) -> None:
    if asked == current:
        return
    raise CsrError(
        "san-mismatch",
        f"CSR SubjectAltName {_names_text(asked)} differs from the current certificate's "
        f"{_names_text(current)}; re-enrollment must repeat the current names exactly",
    )


def check_enroll_subject(csr: x509.CertificateSigningRequest, bound_subject: str) -> None:
    """Bootstrap enrollment: the CSR's only CN must be the device id the credential is bound to."""
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) == 1 and names[0].value == bound_subject:
        return
    raise CsrError(
        "subject-mismatch",
        f"CSR subject {name_text(csr.subject)} does not match this credential, which may only "
        f"enroll CN={bound_subject}",
    )


def name_text(name: x509.Name) -> str:
    """A Name as text in its DER order (CN=x,OU=y), unlike RFC 4514's reversed order."""
    return ",".join(rdn.rfc4514_string() for rdn in name.rdns) or "(empty)"


def _names_text(names: frozenset[x509.GeneralName]) -> str:
    if not names:
        return "(none)"
    return "(" + ", ".join(sorted(_general_name_text(n) for n in names)) + ")"


def _general_name_text(general_name: x509.GeneralName) -> str:
    value = general_name.value
    if isinstance(general_name, x509.DNSName):
        return f"DNS:{value}"
    if isinstance(general_name, x509.IPAddress):
        return f"IP:{value}"
    if isinstance(general_name, x509.UniformResourceIdentifier):
        return f"URI:{value}"
    if isinstance(general_name, x509.RFC822Name):
        return f"email:{value}"
    if isinstance(general_name, x509.DirectoryName):
        return f"dirName:{name_text(value)}"
    if isinstance(general_name, x509.RegisteredID):
        return f"RID:{value.dotted_string}"
    if isinstance(general_name, x509.OtherName):
        return f"otherName:{general_name.type_id.dotted_string}:{value.hex()}"
    return repr(general_name)


def csr_challenge_password(csr: x509.CertificateSigningRequest) -> bytes | None:
    """The raw challengePassword attribute value, or None when the CSR has none."""
    try:
        return csr.attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD).value
    except x509.AttributeNotFound:
        return None


def tls_unique_password(tls_unique: bytes) -> str:
    """Client side: the challengePassword text that carries `tls_unique` (RFC 7030 §3.5)."""
    return base64.b64encode(tls_unique).decode("ascii")


def csr_tls_unique(csr: x509.CertificateSigningRequest) -> bytes | None:
    """The tls-unique value the client put in challengePassword, or None if it put none."""
    password = csr_challenge_password(csr)
    if password is None:
        return None
    try:
        value = binascii.a2b_base64(password.strip(), strict_mode=True)
    except binascii.Error as exc:
        raise CsrError(
            "tls-unique-malformed",
            "CSR challengePassword is not base64 of a tls-unique value (RFC 7030 §3.5)",
        ) from exc
    if not value:
        raise CsrError("tls-unique-malformed", "CSR challengePassword is empty")
    return value


def check_tls_unique(csr: x509.CertificateSigningRequest, tls_unique: bytes) -> None:
    """Proof that the CSR was made on this TLS connection: challengePassword == tls-unique."""
    if not tls_unique:
        # TLS 1.3 has no tls-unique; callers must not ask for this link there.
        raise CsrError(
            "tls-unique-unavailable",
            "this TLS connection has no tls-unique value (TLS 1.3?); connect with TLS 1.2",
        )
    carried = csr_tls_unique(csr)
    if carried is None:
        raise CsrError(
            "tls-unique-missing",
            "CSR has no challengePassword; put base64 of this connection's tls-unique value "
            "in it (RFC 7030 §3.5)",
        )
    if not hmac.compare_digest(carried, tls_unique):
        raise CsrError(
            "tls-unique-mismatch",
            "CSR challengePassword does not match this connection's tls-unique value: "
            "build the CSR on the same TLS connection that sends it",
        )
