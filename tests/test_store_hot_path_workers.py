"""Two forked server workers on one store, under parallel renewals and check-ins.

A real `certfleet server --workers 2`: each worker opens its hot-path
connections after the fork. On SQLite both share one write lock; no request
may fail with "database is locked", and every certificate a device got must
be in the store with its audit row and CERT_ISSUED event.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from sqlalchemy import select

from certfleet.pki.authority import issue_device_certificate
from certfleet.pki.keys import cert_sha256
from certfleet.protocol import CERT_ISSUED
from certfleet.store import certificates, open_store
from certfleet.store.authorities import load_authority
from certfleet.store.factories import get_factory
from certfleet.store.issued import record_device_certificate
from certfleet.store.schema import AuditEntry, OutboxEvent, RegisteredVia

from .cli_run import certfleet
from .server_process import ServerProcess, free_port

DEVICES = 24
IN_FLIGHT = 8


@dataclass
class Device:
    cert: x509.Certificate
    tls: ssl.SSLContext
    csr_body: bytes  # base64 DER of a renewal CSR for a new key


@pytest.fixture
def pki(tmp_path, db_url):
    folder = tmp_path / "pki"
    names = ["--gateway-dns", "localhost", "--gateway-ip", "127.0.0.1"]
    certfleet(
        "keys", "ca", "create", str(folder), "--factory", "acme", *names, "--database", db_url
    )
    if db_url.startswith("postgresql"):
        certfleet("db", "upgrade", "--database", db_url, "--pki", str(folder))
    return folder


async def make_devices(db_url: str, folder: Path) -> list[Device]:
    """Devices whose certificates are recorded in the store, as registration would."""
    store = await open_store(db_url)
    made = []
    try:
        async with store.transaction() as tx:
            authority = await load_authority(tx, "acme", folder)
            factory_id = (await get_factory(tx, "acme")).id
            for n in range(DEVICES):
                device_uuid = str(uuid.uuid4())
                key = ec.generate_private_key(ec.SECP256R1())
                name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, device_uuid)])
                csr = x509.CertificateSigningRequestBuilder().subject_name(name)
                cert = issue_device_certificate(
                    csr.sign(key, hashes.SHA256()), authority.issuing_ca, authority.signer, "acme"
                )
                await record_device_certificate(
                    tx,
                    cert,
                    device_uuid=device_uuid,
                    factory_id=factory_id,
                    issuer_ca_id=authority.issuing_ca_id,
                    request="test",
                    registered_via=RegisteredVia.ONLINE,
                    make_current=True,
                )
                made.append(device(folder, n, cert, key))
    finally:
        await store.close()
    return made


def device(folder: Path, n: int, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Device:
    pem = folder.parent / f"device-{n}.pem"
    pem.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    tls = ssl.create_default_context(cafile=folder / "root.crt")
    tls.load_cert_chain(pem)
    new_key = ec.generate_private_key(ec.SECP256R1())
    renewal = x509.CertificateSigningRequestBuilder().subject_name(cert.subject)
    der = renewal.sign(new_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    return Device(cert, tls, base64.b64encode(der))


async def renew(url: str, device: Device) -> x509.Certificate:
    """simplereenroll on a new connection; the certificate it answered."""
    connector = aiohttp.TCPConnector(ssl=device.tls, force_close=True)
    headers = {"Content-Type": "application/pkcs10"}
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(url, data=device.csr_body, headers=headers) as response:
            body = await response.read()
            assert response.status == 200, body
    (cert,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))
    return cert


async def check_in(url: str, device: Device) -> int:
    connector = aiohttp.TCPConnector(ssl=device.tls, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(url) as response:
            await response.read()
            return response.status


async def in_parallel(calls: list) -> list:
    limit = asyncio.Semaphore(IN_FLIGHT)

    async def one(call):
        async with limit:
            return await call

    return await asyncio.gather(*(one(call) for call in calls))


async def test_two_workers_renew_and_check_in_in_parallel(pki, db_url):
    devices = await make_devices(db_url, pki)
    port = free_port()
    server = ServerProcess(
        *("--pki", str(pki), "--database", db_url, "--listen-est", f"127.0.0.1:{port}"),
        *("--workers", "2"),
        port=port,
    )
    try:
        est = f"https://127.0.0.1:{port}/.well-known/est/simplereenroll"
        gateway = f"https://127.0.0.1:{server.gateway_port}/config"
        renewing = in_parallel([renew(est, d) for d in devices])
        checking = in_parallel([check_in(gateway, d) for d in devices * 2])
        issued, statuses = await asyncio.gather(renewing, checking)
    finally:
        code, out = server.stop()
    assert code == 0, out
    assert "database is locked" not in out and "Traceback" not in out, out
    assert set(statuses) == {200}
    store = await open_store(db_url)
    try:
        async with store.transaction() as tx:
            for cert in issued:
                sha256 = cert_sha256(cert)
                row = await certificates.get_certificate(tx, sha256)
                assert row.issued_by_request.startswith("est:simplereenroll:")
            events = list(
                await tx.scalars(
                    select(OutboxEvent.payload).where(OutboxEvent.topic == CERT_ISSUED)
                )
            )
            audit = list(
                await tx.scalars(
                    select(AuditEntry.details).where(AuditEntry.action == "est.simplereenroll")
                )
            )
    finally:
        await store.close()
    issued_sha256 = {cert_sha256(cert) for cert in issued}
    assert len(issued_sha256) == DEVICES
    assert {e["sha256"] for e in events} == issued_sha256
    assert {a["sha256"] for a in audit} == issued_sha256
