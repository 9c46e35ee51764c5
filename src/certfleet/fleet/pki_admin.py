"""Operator actions on a factory's PKI: files from `pki/`, records in `store/`."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.pki import profiles
from certfleet.pki.crl import build_crl
from certfleet.pki.csr import name_text
from certfleet.pki.errors import PkiError
from certfleet.pki.files import write_atomic
from certfleet.pki.hierarchy import (
    Issued,
    ServerNames,
    issue_device_ca,
    issue_server_tls,
    new_root_file_signer,
    plan_factory,
    verify_chain,
    write_issued,
)
from certfleet.pki.keys import cert_sha256, private_key_pem
from certfleet.pki.pkcs11_signer import Pkcs11Ref, generate_pkcs11_key
from certfleet.pki.pki_dir import (
    EST_TLS,
    KEY_MODE,
    LOCAL_CA_PREFIX,
    ONLINE_CA,
    PkiDir,
    read_cert_file,
)
from certfleet.pki.signer import Signer
from certfleet.protocol import CA_ADDED, CA_DISABLED, CA_REVOKED
from certfleet.store import audit, cas, certificates, factories, outbox
from certfleet.store.authorities import issuing_online_ca
from certfleet.store.engine import opened
from certfleet.store.errors import DuplicateError
from certfleet.store.schema import Ca, CaKind, CaStatus

from .ca_info import CaInfo

ACTOR = "cli"
DEVICE_CA_KINDS = (CaKind.ONLINE, CaKind.LOCAL)


@dataclass(frozen=True)
class HsmSpec:
    """Where to create the root key on a PKCS#11 token."""

    module: str
    token_label: str
    pin: str | None
    key_label: str = "factory-root"
    key_id: bytes = b"\x01"

    def ref(self) -> Pkcs11Ref:
        """The key's PKCS#11 reference (without the PIN)."""
        return Pkcs11Ref(self.module, self.token_label, self.key_label, self.key_id)


@dataclass(frozen=True)
class Revocation:
    """What `revoke_device_ca` did."""

    ca: CaInfo
    crl_path: Path
    affected_devices: list[str]


async def _record(session: AsyncSession, factory_id: int, item: Issued) -> Ca:
    cert = item.cert
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    return await cas.add_ca(
        session,
        factory_id=factory_id,
        name=item.stem,
        kind=CaKind(item.kind),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        sha256=cert_sha256(cert),
        subject=name_text(cert.subject),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        ski=ski.hex(),
        key_ref=item.key_ref,
    )


async def create_factory(
    url: str,
    pki_dir: Path,
    factory: str,
    names: ServerNames,
    *,
    curve: str = "P-256",
    hsm: HsmSpec | None = None,
    passphrase: bytes | None = None,
) -> list[CaInfo]:
    """Create a factory's root, device CAs and TLS certs; refuses if one exists."""
    pki = PkiDir(pki_dir)
    async with opened(url) as store:
        async with store.transaction() as session:
            if any(f.name == factory for f in await factories.list_factories(session)):
                raise PkiError(
                    f"factory {factory!r} already has a root of trust; a root is created once "
                    "(see `certfleet keys ca show`)"
                )
        if pki.cert_path("root").exists():
            raise PkiError(f"{pki.cert_path('root')} already exists: this folder holds a factory")
        if hsm:
            signer, root_key = generate_pkcs11_key(hsm.ref(), hsm.pin, curve), None
        else:
            signer, root_key = new_root_file_signer(curve)
        items = plan_factory(pki, factory, signer, names, curve, root_key)
        write_issued(pki, items, passphrase)
        try:
            async with store.transaction() as session:
                row = await factories.add_factory(session, factory)
                recorded = [await _record(session, row.id, item) for item in items]
                await audit.append_audit(
                    session,
                    actor=ACTOR,
                    action="factory.create",
                    target=factory,
                    details={"cas": [item.stem for item in items], "root_key": signer.key_ref},
                )
        except BaseException:
            _remove_written(pki, items)
            raise
        return [CaInfo.of(ca) for ca in recorded]


def _remove_written(pki: PkiDir, items: list[Issued]) -> None:
    # The store refused the factory: leave the folder as it was.
    for item in items:
        pki.cert_path(item.stem).unlink(missing_ok=True)
        if item.new_key is not None:
            pki.key_path(item.stem).unlink(missing_ok=True)


async def list_cas(url: str, factory: str | None = None) -> list[CaInfo]:
    """Every CA of the factory with its status."""
    async with opened(url) as store, store.transaction() as session:
        row = await factories.resolve_factory(session, factory)
        return [CaInfo.of(ca) for ca in await cas.list_cas(session, row.id)]


async def _root(session: AsyncSession, factory_id: int) -> Ca:
    roots = await cas.list_cas(session, factory_id, kind=CaKind.ROOT)
    if not roots:
        raise PkiError("this factory has no root certificate in the store")
    return roots[0]


def _root_signer(pki: PkiDir, root: Ca, pin: str | None, passphrase: bytes | None) -> Signer:
    if not root.key_ref:
        raise PkiError("the root key is not known to this store")
    try:
        return pki.load_signer(root.key_ref, pin, passphrase)
    except PkiError as exc:
        raise PkiError(f"cannot use the root key: {exc}") from exc


def _next_local_name(existing: list[Ca]) -> str:
    taken = {ca.name for ca in existing}
    return next(
        f"{LOCAL_CA_PREFIX}{i}"
        for i in range(1, len(taken) + 2)
        if f"{LOCAL_CA_PREFIX}{i}" not in taken
    )


async def add_device_ca(url: str, pem: Path, factory: str | None = None) -> CaInfo:
    """Trust an offline device CA made elsewhere; it must chain to the root."""
    cert = read_cert_file(pem)
    _check_is_ca(cert, pem)
    async with opened(url) as store, store.transaction() as session:
        row = await factories.resolve_factory(session, factory)
        root = x509.load_pem_x509_certificate((await _root(session, row.id)).cert_pem.encode())
        verify_chain(cert, root)
        now = dt.datetime.now(dt.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise PkiError(
                f"{pem} is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d} "
                f"to {cert.not_valid_after_utc:%Y-%m-%d})"
            )
        name = _next_local_name(await cas.list_cas(session, row.id))
        item = Issued(CaKind.LOCAL, name, cert, None)
        try:
            ca = await _record(session, row.id, item)
        except DuplicateError as exc:
            raise PkiError(f"{pem} is already a CA of this factory") from exc
        await _ca_changed(session, "ca.add", CA_ADDED, ca)
        return CaInfo.of(ca)


async def _ca_changed(
    session: AsyncSession, action: str, topic: str, ca: Ca, **details: object
) -> None:
    """Audit entry and outbox event for a CA change, in the caller's transaction."""
    data = {"name": ca.name, "kind": ca.kind, "status": ca.status, "sha256": ca.sha256, **details}
    await audit.append_audit(session, actor=ACTOR, action=action, target=ca.name, details=data)
    await outbox.append_event(session, topic, data)


def _check_is_ca(cert: x509.Certificate, pem: Path) -> None:
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        basic = None
    if basic is None or not basic.ca:
        raise PkiError(f"{pem} is not a CA certificate (basicConstraints CA:TRUE is missing)")


async def _device_ca(session: AsyncSession, factory_id: int, name: str) -> Ca:
    ca = await cas.get_ca_by_name(session, factory_id, name)
    if ca.kind not in DEVICE_CA_KINDS:
        raise PkiError(f"{name} is a {ca.kind} certificate, not a device CA")
    return ca


async def disable_device_ca(url: str, name: str, factory: str | None = None) -> CaInfo:
    """Stop new registrations from a device CA; its devices keep working."""
    async with opened(url) as store, store.transaction() as session:
        row = await factories.resolve_factory(session, factory)
        ca = await _device_ca(session, row.id, name)
        if ca.status == CaStatus.REVOKED:
            raise PkiError(f"device CA {name} is already revoked")
        ca = await cas.set_ca_status(session, ca.id, CaStatus.DISABLED)
        await _ca_changed(session, "ca.disable", CA_DISABLED, ca)
        return CaInfo.of(ca)


async def revoke_device_ca(
    url: str,
    pki_dir: Path,
    name: str,
    factory: str | None = None,
    *,
    pin: str | None = None,
    passphrase: bytes | None = None,
) -> Revocation:
    """Refuse every device of a device CA and publish a root-signed CRL (idempotent)."""
    pki = PkiDir(pki_dir)
    async with opened(url) as store, store.transaction() as session:
        row = await factories.resolve_factory(session, factory)
        ca = await _device_ca(session, row.id, name)
        if ca.status != CaStatus.REVOKED:
            await _keep_an_issuer(session, row.id, ca)
        root = await _root(session, row.id)
        signer = _root_signer(pki, root, pin, passphrase)
        revoked = [
            c
            for c in await cas.list_cas(session, row.id)
            if c.status == CaStatus.REVOKED or c.id == ca.id
        ]
        now = dt.datetime.now(dt.UTC)
        crl = build_crl(
            x509.load_pem_x509_certificate(root.cert_pem.encode()),
            signer,
            [(_serial(c), c.status_changed_at or now) for c in revoked],
            number=int(time.time()),
        )
        if ca.status != CaStatus.REVOKED:
            ca = await cas.set_ca_status(session, ca.id, CaStatus.REVOKED)
        affected = await certificates.devices_with_certificates_from(session, ca.id)
        await _ca_changed(session, "ca.revoke", CA_REVOKED, ca, devices=len(affected))
        crl_path = pki.path / "crl" / "root.crl"
        crl_path.parent.mkdir(mode=0o755, exist_ok=True)
        write_atomic(crl_path, crl.public_bytes(serialization.Encoding.PEM), 0o444)
        return Revocation(CaInfo.of(ca), crl_path, affected)


async def _keep_an_issuer(session: AsyncSession, factory_id: int, ca: Ca) -> None:
    """Refuse to take away the last online CA: the server could issue nothing after it."""
    rows = await cas.list_cas(session, factory_id)
    if ca.id != getattr(issuing_online_ca(rows), "id", None):
        return
    if issuing_online_ca([c for c in rows if c.id != ca.id]) is None:
        raise PkiError(
            f"{ca.name} is the factory's only online CA: make its successor first with "
            f"`certfleet keys ca new-online-ca`, move its devices with `certfleet campaigns "
            f"create --reissue-from-ca {ca.name} --to-ca <new>`, then revoke it"
        )


def _serial(ca: Ca) -> int:
    return x509.load_pem_x509_certificate(ca.cert_pem.encode()).serial_number


async def new_local_ca(
    url: str,
    pki_dir: Path,
    out_dir: Path,
    factory: str | None = None,
    *,
    pin: str | None = None,
    passphrase: bytes | None = None,
) -> CaInfo:
    """A further offline device CA; its key is written to `out_dir` only."""
    pki, out = PkiDir(pki_dir), PkiDir(out_dir)
    async with opened(url) as store, store.transaction() as session:
        row = await factories.resolve_factory(session, factory)
        root = await _root(session, row.id)
        signer = _root_signer(pki, root, pin, passphrase)
        name = _next_local_name(await cas.list_cas(session, row.id))
        issuer = profiles.Issuer.of(x509.load_pem_x509_certificate(root.cert_pem.encode()))
        common_name = "Local-CA-" + name.removeprefix(LOCAL_CA_PREFIX)
        item = issue_device_ca(CaKind.LOCAL, name, common_name, row.name, out, signer, issuer)
        item.key_ref = None  # kept offline: the server never signs with it
        ca = await _record(session, row.id, item)
        write_issued(out, [item])
        await _ca_changed(session, "ca.new-local", CA_ADDED, ca)
        return CaInfo.of(ca)


async def est_authorize(
    url: str,
    pki_dir: Path,
    factory: str | None,
    dns: list[str],
    ips: list[str],
    *,
    pin: str | None = None,
    passphrase: bytes | None = None,
) -> CaInfo:
    """Issue or replace the EST server's TLS certificate and key."""
    pki = PkiDir(pki_dir)
    async with opened(url) as store, store.transaction() as session:
        row = await factories.resolve_factory(session, factory)
        root = await _root(session, row.id)
        signer = _root_signer(pki, root, pin, passphrase)
        current = [c for c in await cas.list_cas(session, row.id, kind=CaKind.EST_TLS)]
        if not (dns or ips):
            if not current:
                raise PkiError("give the EST server's name with --est-dns or --est-ip")
            dns, ips = _san_names(current[0])
        issuer = profiles.Issuer.of(x509.load_pem_x509_certificate(root.cert_pem.encode()))
        item = issue_server_tls(CaKind.EST_TLS, EST_TLS, row.name, pki, signer, issuer, dns, ips)
        if current:
            ca = await _replace(session, current[0], item)
        else:
            ca = await _record(session, row.id, item)
        assert item.new_key is not None
        pki.ensure()
        write_atomic(pki.key_path(EST_TLS), private_key_pem(item.new_key), KEY_MODE)
        pki.write_cert(EST_TLS, item.cert, replace=True)
        await audit.append_audit(
            session,
            actor=ACTOR,
            action="est.authorize",
            target=EST_TLS,
            details={"dns": dns, "ip": ips, "sha256": ca.sha256},
        )
        return CaInfo.of(ca)


def _san_names(ca: Ca) -> tuple[list[str], list[str]]:
    cert = x509.load_pem_x509_certificate(ca.cert_pem.encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName), [
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    ]


async def _replace(session: AsyncSession, ca: Ca, item: Issued) -> Ca:
    cert = item.cert
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    return await cas.replace_ca_certificate(
        session,
        ca.id,
        cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        sha256=cert_sha256(cert),
        subject=name_text(cert.subject),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        ski=ski.hex(),
    )


async def new_online_ca(
    url: str,
    pki_dir: Path,
    factory: str | None = None,
    *,
    pin: str | None = None,
    passphrase: bytes | None = None,
) -> tuple[CaInfo, CaInfo | None]:
    """A further online CA, signed by the root, that issues from now on; and the one it replaces.

    Its key goes into the PKI folder like the first one's. The replaced CA stays
    trusted, so its devices keep working until a campaign moves them
    (`--reissue-from-ca OLD --to-ca NEW`) and the operator revokes it.
    """
    pki = PkiDir(pki_dir)
    written: list[Issued] = []
    async with opened(url) as store:
        try:
            async with store.transaction() as session:
                row = await factories.resolve_factory(session, factory)
                root = await _root(session, row.id)
                signer = _root_signer(pki, root, pin, passphrase)
                existing = await cas.list_cas(session, row.id)
                replaced = issuing_online_ca(existing)
                name = _next_online_name(existing)
                issuer = profiles.Issuer.of(x509.load_pem_x509_certificate(root.cert_pem.encode()))
                common_name = "Online-CA-" + name.removeprefix(f"{ONLINE_CA}-")
                curve = _curve(replaced)
                item = issue_device_ca(
                    CaKind.ONLINE, name, common_name, row.name, pki, signer, issuer, curve
                )
                ca = await _record(session, row.id, item)
                replaces = replaced.name if replaced else None
                await _ca_changed(session, "ca.new-online", CA_ADDED, ca, replaces=replaces)
                write_issued(pki, [item])
                written.append(item)
        except BaseException:
            _remove_written(pki, written)  # the store refused it: no orphan key
            raise
    return CaInfo.of(ca), (CaInfo.of(replaced) if replaced else None)


def _next_online_name(existing: list[Ca]) -> str:
    taken = {ca.name for ca in existing}
    return next(
        f"{ONLINE_CA}-{i}" for i in range(2, len(taken) + 3) if f"{ONLINE_CA}-{i}" not in taken
    )


def _curve(ca: Ca | None) -> str:
    """The curve of the CA being replaced, so that the new one is as strong."""
    if ca is None:
        return "P-256"
    key = x509.load_pem_x509_certificate(ca.cert_pem.encode()).public_key()
    curves = {"secp256r1": "P-256", "secp384r1": "P-384"}
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in curves:
        raise PkiError(f"online CA {ca.name} has a key type this tool does not make")
    return curves[key.curve.name]
