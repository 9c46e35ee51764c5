"""Loading factory authorities and recording issued device certificates."""

from __future__ import annotations

import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from certfleet.fleet import pki_admin
from certfleet.pki.authority import issue_device_certificate
from certfleet.pki.errors import PkiError
from certfleet.pki.hierarchy import ServerNames
from certfleet.pki.keys import generate_private_key
from certfleet.store import certificates, devices
from certfleet.store.authorities import load_authority, load_pki_authorities
from certfleet.store.engine import open_store
from certfleet.store.errors import NotFoundError
from certfleet.store.issued import record_device_certificate
from certfleet.store.schema import RegisteredVia


@pytest.fixture
async def factory(tmp_path, db_url):
    names = ServerNames(gateway_dns=["localhost"])
    await pki_admin.create_factory(db_url, tmp_path / "pki", "acme", names)
    store = await open_store(db_url)
    yield store, tmp_path / "pki"
    await store.close()


def _csr(device_uuid: str):
    key = generate_private_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_uuid)])
    return x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())


async def test_authority_issues_and_records(factory):
    store, pki = factory
    async with store.transaction() as session:
        authority = await load_authority(session, "acme", pki)
    assert authority.issuing_ca.subject.rfc4514_string() == "OU=acme,CN=Online-CA"
    assert len(authority.device_cas) == 2
    device_uuid = str(uuid.uuid4())
    cert = issue_device_certificate(
        _csr(device_uuid), authority.issuing_ca, authority.signer, "acme"
    )
    async with store.transaction() as session:
        with pytest.raises(NotFoundError):
            await record_device_certificate(
                session,
                cert,
                device_uuid=device_uuid,
                factory_id=1,
                issuer_ca_id=authority.issuing_ca_id,
                request="test",
            )
    async with store.transaction() as session:
        row = await record_device_certificate(
            session,
            cert,
            device_uuid=device_uuid,
            factory_id=1,
            issuer_ca_id=authority.issuing_ca_id,
            request="test:1",
            registered_via=RegisteredVia.ONLINE,
            make_current=True,
        )
    async with store.transaction() as session:
        device = await devices.get_device(session, device_uuid)
        assert device.current_cert_id == row.id
        stored = await certificates.list_device_certificates(session, device_uuid)
        assert [c.issued_by_request for c in stored] == ["test:1"]


async def test_revoked_device_ca_is_not_trusted(factory, db_url):
    store, pki = factory
    await pki_admin.revoke_device_ca(db_url, pki, "local-ca-1")
    async with store.transaction() as session:
        authorities = await load_pki_authorities(session, pki)
    assert len(authorities["acme"].device_cas) == 1


async def test_disabled_online_ca_cannot_issue(factory, db_url):
    store, pki = factory
    await pki_admin.disable_device_ca(db_url, "online-ca")
    async with store.transaction() as session:
        with pytest.raises(PkiError, match="no active online CA"):
            await load_authority(session, "acme", pki)


async def test_a_pki_folder_serves_its_own_factory(factory, db_url, tmp_path):
    store, pki = factory
    other = tmp_path / "other"
    await pki_admin.create_factory(db_url, other, "globex", ServerNames(gateway_dns=["x"]))
    async with store.transaction() as session:
        assert list(await load_pki_authorities(session, pki)) == ["acme"]
        assert list(await load_pki_authorities(session, other)) == ["globex"]
    stray = tmp_path / "stray"
    await pki_admin.create_factory(
        f"sqlite:///{tmp_path}/stray.db", stray, "initech", ServerNames(gateway_dns=["x"])
    )
    async with store.transaction() as session:
        with pytest.raises(PkiError, match="belongs to no factory in this store"):
            await load_pki_authorities(session, stray)
