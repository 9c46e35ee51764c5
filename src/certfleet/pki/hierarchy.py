"""Create a factory's certificate hierarchy: root, device CAs and server TLS certs."""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from . import profiles
from .errors import PkiError
from .keys import generate_private_key
from .pki_dir import EST_TLS, GATEWAY_TLS, ONLINE_CA, ROOT, PkiDir
from .signer import FileSigner, Signer


@dataclass
class Issued:
    """One certificate of the hierarchy and, for server-held keys, its new private key."""

    kind: str  # root | online | local | gateway-tls | est-tls
    stem: str
    cert: x509.Certificate
    key_ref: str | None
    new_key: ec.EllipticCurvePrivateKey | None = None


@dataclass
class ServerNames:
    """Host names and addresses devices use to reach the gateway and the EST server."""

    gateway_dns: list[str] = field(default_factory=list)
    gateway_ip: list[str] = field(default_factory=list)
    est_dns: list[str] = field(default_factory=list)
    est_ip: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not (self.gateway_dns or self.gateway_ip):
            raise PkiError("give the gateway's host name (--gateway-dns) or address (--gateway-ip)")
        if not (self.est_dns or self.est_ip):
            # Usually one server answers both; reuse the gateway's names.
            self.est_dns, self.est_ip = list(self.gateway_dns), list(self.gateway_ip)


def _issue_with_new_key(
    kind: str, stem: str, builder_for: object, pki: PkiDir, signer: Signer, curve: str
) -> Issued:
    key = generate_private_key(curve)
    cert = signer.sign_certificate(builder_for(key.public_key()))  # type: ignore[operator]
    return Issued(kind, stem, cert, pki.key_ref(stem), key)


def plan_factory(
    pki: PkiDir,
    factory: str,
    root_signer: Signer,
    names: ServerNames,
    curve: str = "P-256",
    root_key: ec.EllipticCurvePrivateKey | None = None,
) -> list[Issued]:
    """Build every certificate of a new factory in memory; nothing is written yet."""
    root_cert = root_signer.sign_certificate(profiles.root_ca(factory, root_signer.public_key))
    root = Issued("root", ROOT, root_cert, root_signer.key_ref, root_key)
    issuer = profiles.Issuer.of(root_cert)
    local_stem = pki.next_local_ca_stem()
    return [
        root,
        issue_device_ca("online", ONLINE_CA, "Online-CA", factory, pki, root_signer, issuer, curve),
        issue_device_ca(
            "local", local_stem, "Local-CA-1", factory, pki, root_signer, issuer, curve
        ),
        issue_server_tls(
            "gateway-tls",
            GATEWAY_TLS,
            factory,
            pki,
            root_signer,
            issuer,
            names.gateway_dns,
            names.gateway_ip,
            curve,
        ),
        issue_server_tls(
            "est-tls",
            EST_TLS,
            factory,
            pki,
            root_signer,
            issuer,
            names.est_dns,
            names.est_ip,
            curve,
        ),
    ]


def issue_device_ca(
    kind: str,
    stem: str,
    common_name: str,
    factory: str,
    pki: PkiDir,
    root_signer: Signer,
    issuer: profiles.Issuer,
    curve: str = "P-256",
) -> Issued:
    """A new device CA (online or offline) with a new key, signed by the root."""
    return _issue_with_new_key(
        kind,
        stem,
        lambda pub: profiles.device_ca(common_name, factory, pub, issuer),
        pki,
        root_signer,
        curve,
    )


def issue_server_tls(
    kind: str,
    stem: str,
    factory: str,
    pki: PkiDir,
    root_signer: Signer,
    issuer: profiles.Issuer,
    dns: list[str],
    ips: list[str],
    curve: str = "P-256",
) -> Issued:
    """A TLS server certificate with a new key, signed by the root."""
    common_name = (dns or ips)[0]
    return _issue_with_new_key(
        kind,
        stem,
        lambda pub: profiles.server_tls(common_name, factory, pub, issuer, dns, ips),
        pki,
        root_signer,
        curve,
    )


def write_issued(pki: PkiDir, items: list[Issued], passphrase: bytes | None = None) -> None:
    """Write keys (0400) and certificates (0444); refuses to replace existing files."""
    pki.ensure()
    for item in items:
        if pki.cert_path(item.stem).exists() or pki.key_path(item.stem).exists():
            raise PkiError(f"{pki.cert_path(item.stem)} already exists; refusing to overwrite it")
    for item in items:
        if item.new_key is not None:
            # Only the root key may carry a passphrase: the server must open the others unattended.
            pki.write_key(item.stem, item.new_key, passphrase if item.kind == "root" else None)
        pki.write_cert(item.stem, item.cert)


def new_root_file_signer(curve: str = "P-256") -> tuple[FileSigner, ec.EllipticCurvePrivateKey]:
    """A new root key held in memory until `write_issued` stores it."""
    key = generate_private_key(curve)
    return FileSigner(key, key_ref=f"file:{ROOT}.key"), key


def verify_chain(cert: x509.Certificate, root: x509.Certificate) -> None:
    """Check that `cert` was signed by `root` (directly); PkiError otherwise."""
    try:
        cert.verify_directly_issued_by(root)
    except (ValueError, TypeError) as exc:
        raise PkiError(
            f"certificate {cert.subject.rfc4514_string()} does not chain to the factory root "
            f"{root.subject.rfc4514_string()}"
        ) from exc
    except Exception as exc:  # InvalidSignature has no common base with ValueError
        raise PkiError(
            f"certificate {cert.subject.rfc4514_string()} is not signed by the factory root"
        ) from exc
