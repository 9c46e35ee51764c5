"""The on-disk layout of a factory PKI folder and how key references resolve."""

from __future__ import annotations

import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .errors import PkiError
from .files import write_atomic, write_new
from .keys import private_key_pem
from .pkcs11_signer import Pkcs11Ref, Pkcs11Signer
from .signer import Signer, load_file_signer

ROOT = "root"
ONLINE_CA = "online-ca"
GATEWAY_TLS = "gateway-tls"
EST_TLS = "est-tls"
LOCAL_CA_PREFIX = "local-ca-"
CERT_MODE = 0o444
KEY_MODE = 0o400


class PkiDir:
    """A folder holding `<name>.crt` (0444) and `<name>.key` (0400) files."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def cert_path(self, stem: str) -> Path:
        """Where the certificate called `stem` lives."""
        return self.path / f"{stem}.crt"

    def key_path(self, stem: str) -> Path:
        """Where the private key called `stem` lives."""
        return self.path / f"{stem}.key"

    def key_ref(self, stem: str) -> str:
        """Key reference stored in the database: relative, so the folder can move."""
        return f"file:{stem}.key"

    def ensure(self) -> None:
        """Create the folder, private to its owner."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.chmod(0o700)

    def write_cert(self, stem: str, cert: x509.Certificate, replace: bool = False) -> Path:
        """Write a certificate as PEM."""
        path = self.cert_path(stem)
        data = cert.public_bytes(serialization.Encoding.PEM)
        (write_atomic if replace else _write_new_cert)(path, data, CERT_MODE)
        return path

    def write_key(
        self, stem: str, key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None
    ) -> Path:
        """Write a new private key file (0400); never replaces an existing key."""
        path = self.key_path(stem)
        write_new(path, private_key_pem(key, passphrase), KEY_MODE)
        return path

    def read_cert(self, stem: str) -> x509.Certificate:
        """Read a certificate written by `write_cert`."""
        return read_cert_file(self.cert_path(stem))

    def next_local_ca_stem(self) -> str:
        """The first free `local-ca-N` name."""
        taken = {
            int(m.group(1))
            for p in self.path.glob(f"{LOCAL_CA_PREFIX}*.crt")
            if (m := re.fullmatch(rf"{LOCAL_CA_PREFIX}(\d+)\.crt", p.name))
        }
        return f"{LOCAL_CA_PREFIX}{next(i for i in range(1, len(taken) + 2) if i not in taken)}"

    def load_signer(
        self, key_ref: str, pin: str | None = None, passphrase: bytes | None = None
    ) -> Signer:
        """Open the key a CA row refers to: a file in this folder or a PKCS#11 URI."""
        if key_ref.startswith("pkcs11:"):
            return Pkcs11Signer(Pkcs11Ref.parse(key_ref), pin)
        if key_ref.startswith("file:"):
            path = Path(key_ref.removeprefix("file:"))
            return load_file_signer(path if path.is_absolute() else self.path / path, passphrase)
        raise PkiError(f"unknown key reference {key_ref!r}: expected file:... or pkcs11:...")


def _write_new_cert(path: Path, data: bytes, mode: int) -> None:
    write_new(path, data, mode)


def read_cert_file(path: Path) -> x509.Certificate:
    """Read one PEM or DER certificate, with a clear error for anything else."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read certificate {path}: {exc.strerror}") from exc
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise PkiError(f"{path} is not a PEM or DER X.509 certificate") from exc
