"""One interface for a private key that signs certificates and CRLs and does ECDH.

File keys sign through cryptography directly. Keys that cannot leave their
token (PKCS#11) sign the to-be-signed bytes themselves; `_assemble` puts the
signature into the DER structure, so both kinds produce identical objects.
asn1crypto is imported where a token key needs it: a device with a file key
never loads it (about 18 ms of CPU at start-up).
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .errors import PkiError
from .files import check_private_file_mode
from .keys import check_public_key, curve_label, hash_for_curve


class Signer(ABC):
    """A CA or device private key, wherever it is kept."""

    key_ref: str

    @property
    @abstractmethod
    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The signer's public key."""

    @abstractmethod
    def sign(self, data: bytes, algorithm: hashes.HashAlgorithm) -> bytes:
        """Return a DER-encoded ECDSA signature over `data`."""

    @abstractmethod
    def exchange(self, peer: ec.EllipticCurvePublicKey) -> bytes:
        """Return the raw ECDH shared secret (x coordinate) with `peer`."""

    @property
    def hash_algorithm(self) -> hashes.HashAlgorithm:
        """Hash used for certificates and CRLs signed by this key."""
        return hash_for_curve(self.public_key.curve)

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        """Sign a certificate builder with this key."""
        from asn1crypto import x509 as asn1_x509

        template = builder.sign(_placeholder_key(self.public_key.curve), self.hash_algorithm)
        signature = self.sign(template.tbs_certificate_bytes, self.hash_algorithm)
        der = _assemble(asn1_x509.Certificate, template, "signature_value", signature)
        return x509.load_der_x509_certificate(der)

    def sign_csr(
        self, builder: x509.CertificateSigningRequestBuilder
    ) -> x509.CertificateSigningRequest:
        """Sign a CSR builder with this key (proof of possession of the device key)."""
        from asn1crypto import csr as asn1_csr
        from asn1crypto import keys as asn1_keys

        template = builder.sign(_placeholder_key(self.public_key.curve), self.hash_algorithm)
        request = asn1_csr.CertificationRequest.load(
            template.public_bytes(serialization.Encoding.DER)
        )
        # The builder put the placeholder's public key in the signed part; use ours.
        info = request["certification_request_info"]
        info["subject_pk_info"] = asn1_keys.PublicKeyInfo.load(
            self.public_key.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        request["signature"] = self.sign(info.dump(force=False), self.hash_algorithm)
        return x509.load_der_x509_csr(request.dump())

    def sign_crl(
        self, builder: x509.CertificateRevocationListBuilder
    ) -> x509.CertificateRevocationList:
        """Sign a CRL builder with this key."""
        from asn1crypto import crl as asn1_crl

        template = builder.sign(_placeholder_key(self.public_key.curve), self.hash_algorithm)
        signature = self.sign(template.tbs_certlist_bytes, self.hash_algorithm)
        der = _assemble(asn1_crl.CertificateList, template, "signature", signature)
        return x509.load_der_x509_crl(der)


@functools.cache
def _placeholder_key(curve: ec.EllipticCurve) -> ec.EllipticCurvePrivateKey:
    # Builds the exact TBS bytes; its signature is always replaced, never published.
    return ec.generate_private_key(type(curve)())


def _assemble(spec: type, template: object, signature_field: str, signature: bytes) -> bytes:
    # Only the signature is replaced; the TBS part keeps its exact encoding.
    parsed = spec.load(template.public_bytes(serialization.Encoding.DER))
    parsed[signature_field] = signature
    return parsed.dump()


class FileSigner(Signer):
    """A private key held in a PEM file (or in memory, for a device)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, key_ref: str = "memory") -> None:
        check_public_key(key.public_key())
        self._key = key
        self.key_ref = key_ref

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    @property
    def private_key(self) -> ec.EllipticCurvePrivateKey:
        """The key object, for TLS contexts and CSRs on the device itself."""
        return self._key

    def sign(self, data: bytes, algorithm: hashes.HashAlgorithm) -> bytes:
        return self._key.sign(data, ec.ECDSA(algorithm))

    def exchange(self, peer: ec.EllipticCurvePublicKey) -> bytes:
        return self._key.exchange(ec.ECDH(), peer)

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        return builder.sign(self._key, self.hash_algorithm)

    def sign_csr(
        self, builder: x509.CertificateSigningRequestBuilder
    ) -> x509.CertificateSigningRequest:
        return builder.sign(self._key, self.hash_algorithm)

    def sign_crl(
        self, builder: x509.CertificateRevocationListBuilder
    ) -> x509.CertificateRevocationList:
        return builder.sign(self._key, self.hash_algorithm)


def load_file_signer(path: Path, passphrase: bytes | None = None) -> FileSigner:
    """Load a PEM private key, refusing files others can read and unsupported key types."""
    path = Path(path)
    if not path.is_file():
        raise PkiError(f"key file {path} does not exist")
    check_private_file_mode(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), passphrase)
    except TypeError as exc:
        raise PkiError(f"key file {path} is encrypted: give its passphrase") from exc
    except ValueError as exc:
        raise PkiError(f"cannot read key file {path}: wrong passphrase or not a PEM key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        check_public_key(key.public_key())
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    curve_label(key.curve)
    return FileSigner(key, key_ref=f"file:{path}")
