"""Load each factory's trust anchors and issuing key for a server process."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.pki.authority import FactoryAuthority
from certfleet.pki.errors import PkiError
from certfleet.pki.keys import cert_sha256
from certfleet.pki.pki_dir import ROOT, PkiDir
from certfleet.store import cas, factories
from certfleet.store.schema import Ca, CaKind, CaStatus

DEVICE_CA_KINDS = (CaKind.ONLINE, CaKind.LOCAL)


def issuing_online_ca(rows: list[Ca]) -> Ca | None:
    """The online CA the server issues with: the newest active one with a key.

    A factory gets a further online CA (`keys ca new-online-ca`) when the one
    in use must be replaced; the older ones stay trusted until revoked.
    """
    usable = [c for c in rows if c.kind == CaKind.ONLINE and c.status == CaStatus.ACTIVE]
    usable = [c for c in usable if c.key_ref]
    return max(usable, key=lambda c: c.id, default=None)


def _cert(row: Ca) -> x509.Certificate:
    return x509.load_pem_x509_certificate(row.cert_pem.encode())


async def load_authority(
    session: AsyncSession, factory: str, pki_dir: Path, pin: str | None = None
) -> FactoryAuthority:
    """Root, issuing online CA (with its signer) and every non-revoked device CA of a factory."""
    row = await factories.get_factory(session, factory)
    rows = await cas.list_cas(session, row.id)
    roots = [c for c in rows if c.kind == CaKind.ROOT]
    online = issuing_online_ca(rows)
    if not roots or online is None:
        raise PkiError(f"factory {factory!r} has no root or no active online CA with a key")
    device_cas = {
        c.sha256: _cert(c)
        for c in rows
        if c.kind in DEVICE_CA_KINDS and c.status != CaStatus.REVOKED
    }
    return FactoryAuthority(
        factory=factory,
        root=_cert(roots[0]),
        issuing_ca=_cert(online),
        issuing_ca_id=online.id,
        signer=PkiDir(pki_dir).load_signer(online.key_ref or "", pin),
        device_cas=device_cas,
    )


async def load_pki_authorities(
    session: AsyncSession, pki_dir: Path, pin: str | None = None
) -> dict[str, FactoryAuthority]:
    """The factory whose root is in `pki_dir` (one PKI folder serves one factory), by name."""
    root_sha256 = cert_sha256(PkiDir(pki_dir).read_cert(ROOT))
    for factory in await factories.list_factories(session):
        roots = await cas.list_cas(session, factory.id, kind=CaKind.ROOT)
        if roots and roots[0].sha256 == root_sha256:
            return {factory.name: await load_authority(session, factory.name, pki_dir, pin)}
    raise PkiError(
        f"the root in {pki_dir} belongs to no factory in this store: check --pki and --database"
    )
