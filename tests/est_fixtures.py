"""The EST server on loopback TLS for tests: two factories in one store, devices, clients.

`running_env` gives an `EstEnv` whose server runs with the stdlib TLS stack
(TLS 1.2 and 1.3, client certs optional, trusting both factories' device CAs
and roots), as `certfleet server` would. Devices are issued with the real
factory CAs and recorded in the store.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import os
import shutil
import socket
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import func, select

from certfleet.est.admin import create_credential
from certfleet.est.app import make_est_app
from certfleet.est.policy import EstPolicy
from certfleet.est.service import EstService
from certfleet.est.wire import PKCS10
from certfleet.fleet import pki_admin
from certfleet.pki import profiles
from certfleet.pki.authority import FactoryAuthority, issue_device_certificate
from certfleet.pki.hierarchy import ServerNames
from certfleet.pki.keys import generate_private_key, private_key_pem
from certfleet.pki.pkcs7 import load_certs_only
from certfleet.pki.pki_dir import PkiDir
from certfleet.store import Store, cas, factories, open_store
from certfleet.store.authorities import load_authority
from certfleet.store.issued import record_device_certificate
from certfleet.store.schema import (
    AuditEntry,
    Certificate,
    Device,
    EstCredential,
    EstPending,
    OutboxEvent,
    RegisteredVia,
)

FACTORIES = ("acme", "globex")
DEVICE_CA_STEMS = ("online-ca", "local-ca-1")


@dataclass
class Reply:
    """An HTTP answer as a test sees it."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def certs(self) -> list[x509.Certificate]:
        """The certificates of a 200 certs-only answer."""
        assert self.status == 200, f"{self.status}: {self.text}"
        return load_certs_only(base64.b64decode(self.body))


@dataclass
class DeviceId:
    """A device's key and current certificate, also as files for curl and ssl."""

    uuid: str
    factory: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    key_path: Path
    cert_path: Path

    def csr(self, **kwargs) -> bytes:
        """A DER CSR for a fresh key (or `key=`) with this device's current subject."""
        kwargs.setdefault("subject", self.cert.subject)
        return make_csr(kwargs.pop("key", None) or generate_private_key(), **kwargs)


@dataclass
class Server:
    runner: web.AppRunner
    port: int
    policy: EstPolicy
    tls: bool
    listener: asyncio.AbstractServer | None = None


@dataclass
class EstEnv:
    db_url: str
    store: Store
    tmp: Path
    pki: dict[str, Path]
    authorities: dict[str, FactoryAuthority] = field(default_factory=dict)
    server: Server | None = None

    # -- server ------------------------------------------------------------------------

    async def serve(
        self,
        tls: bool = True,
        authorities: dict | None = None,
        stack: str = "stdlib",
        **policy_fields,
    ) -> Server:
        """(Re)start the EST server with a policy made of `policy_fields`."""
        await self.stop()
        authorities = authorities or self.authorities
        policy_fields.setdefault("default_label", "acme" if "acme" in authorities else None)
        policy = EstPolicy(**policy_fields)
        service = EstService(self.store, authorities, policy)
        app = make_est_app(service, policy)  # the default PeerReader, as the server uses
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        listener = None
        if stack == "openssl4":
            listener = await self._serve_openssl4(runner)
            port = listener.sockets[0].getsockname()[1]
        else:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            site = web.SockSite(runner, sock, ssl_context=self.server_tls() if tls else None)
            await site.start()
        self.server = Server(runner, port, policy, tls, listener)
        return self.server

    async def _serve_openssl4(self, runner: web.AppRunner) -> asyncio.AbstractServer:
        """The pyOpenSSL stack of certfleet.tls (what `certfleet server` uses for speed)."""
        from certfleet.tls import server_context, start_tls_server

        acme = self.pki["acme"]
        trusted = [
            x509.load_pem_x509_certificate((folder / f"{stem}.crt").read_bytes())
            for folder in self.pki.values()
            for stem in ("root", *DEVICE_CA_STEMS)
        ]
        context = server_context(
            acme / "est-tls.crt", acme / "est-tls.key", trusted, require_client_cert=False
        )
        return await start_tls_server(runner.server, "127.0.0.1", 0, context)

    async def stop(self) -> None:
        if self.server is not None:
            if self.server.listener is not None:
                self.server.listener.close()
            await self.server.runner.cleanup()
            self.server = None

    def server_tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        acme = self.pki["acme"]
        context.load_cert_chain(acme / "est-tls.crt", acme / "est-tls.key")
        context.verify_mode = ssl.CERT_OPTIONAL
        for folder in self.pki.values():
            for stem in ("root", *DEVICE_CA_STEMS):
                context.load_verify_locations(folder / f"{stem}.crt")
        return context

    def client_tls(self, device: DeviceId | None = None, tls: str | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.root())
        if device is not None:
            context.load_cert_chain(device.cert_path, device.key_path)
        if tls == "1.2":
            context.maximum_version = ssl.TLSVersion.TLSv1_2
        elif tls == "1.3":
            context.minimum_version = ssl.TLSVersion.TLSv1_3
        return context

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    def base(self) -> str:
        scheme = "https" if self.server and self.server.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def url(self, op: str, label: str | None = None) -> str:
        middle = f"/{label}" if label else ""
        return f"{self.base()}/.well-known/est{middle}/{op}"

    def root(self, factory: str = "acme") -> Path:
        return self.pki[factory] / "root.crt"

    def chain_file(self, factory: str = "acme") -> Path:
        return self.pki[factory] / "online-ca.crt"

    # -- clients -----------------------------------------------------------------------

    async def request(
        self,
        method: str,
        op: str,
        body: bytes | None = None,
        *,
        label: str | None = None,
        device: DeviceId | None = None,
        auth: tuple[str, str] | None = None,
        content_type: str | None = PKCS10,
        headers: dict[str, str] | None = None,
        tls: str | None = None,
        path: str | None = None,
    ) -> Reply:
        """One request on a new connection, as a device would make it."""
        sent = dict(headers or {})
        if body is not None and content_type is not None:
            sent.setdefault("Content-Type", content_type)
        ssl_context = self.client_tls(device, tls) if self.server.tls else False
        connector = aiohttp.TCPConnector(ssl=ssl_context, force_close=True)
        if auth is not None:
            sent.setdefault("Authorization", aiohttp.encode_basic_auth(*auth))
        url = self.url(op, label) if path is None else self.base() + path
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.request(method, url, data=body, headers=sent) as response:
                return Reply(response.status, dict(response.headers), await response.read())

    async def post_csr(self, op: str, csr_der: bytes, **kwargs) -> Reply:
        """POST a CSR the RFC 8951 way (base64 of DER)."""
        return await self.request("POST", op, base64.b64encode(csr_der), **kwargs)

    # -- fleet -------------------------------------------------------------------------

    async def factory_id(self, factory: str) -> int:
        async with self.store.transaction() as session:
            return (await factories.get_factory(session, factory)).id

    async def device(
        self,
        factory: str = "acme",
        ca: str = "online-ca",
        *,
        now: dt.datetime | None = None,
        validity: dt.timedelta = profiles.YEAR,
        record: bool = True,
        sans: list[x509.GeneralName] | None = None,
    ) -> DeviceId:
        """A device with a certificate from `ca` of `factory`, recorded in the store."""
        device_uuid = str(uuid.uuid4())
        key = generate_private_key()
        csr = x509.load_der_x509_csr(make_csr(key, cn=device_uuid))
        folder = PkiDir(self.pki[factory])
        factory_id = await self.factory_id(factory)
        async with self.store.transaction() as session:
            ca_row = await cas.get_ca_by_name(session, factory_id, ca)
            signer = folder.load_signer(f"file:{ca}.key")
            cert = issue_device_certificate(
                csr, folder.read_cert(ca), signer, factory, validity, now
            )
            if sans:
                issuer = profiles.Issuer.of(folder.read_cert(ca))
                builder = profiles.device(
                    device_uuid, factory, key.public_key(), issuer, validity, now, sans
                )
                cert = signer.sign_certificate(builder)
            if record:
                await record_device_certificate(
                    session,
                    cert,
                    device_uuid=device_uuid,
                    factory_id=factory_id,
                    issuer_ca_id=ca_row.id,
                    request="test:setup",
                    registered_via=RegisteredVia.ONLINE,
                    make_current=True,
                )
        return self.save_device(device_uuid, factory, key, cert)

    def save_device(
        self, device_uuid: str, factory: str, key: ec.EllipticCurvePrivateKey, cert
    ) -> DeviceId:
        folder = self.tmp / "devices"
        folder.mkdir(exist_ok=True)
        key_path = folder / f"{device_uuid}-{cert.serial_number:x}.key"
        cert_path = key_path.with_suffix(".crt")
        key_path.write_bytes(private_key_pem(key))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return DeviceId(device_uuid, factory, key, cert, key_path, cert_path)

    async def credential(
        self, device_uuid: str | None = None, factory: str = "acme", expires_in=None
    ) -> tuple[str, str, str]:
        """(device uuid, username, password) of a new bootstrap credential."""
        device_uuid = device_uuid or str(uuid.uuid4())
        created = await create_credential(
            self.store, device_uuid, expires_in or dt.timedelta(days=1), factory
        )
        return device_uuid, created.username, created.password

    async def counts(self) -> dict[str, int]:
        """Rows that a refused request must not add or change."""
        async with self.store.transaction() as session:
            counts = {
                table.__tablename__: await session.scalar(select(func.count()).select_from(table))
                for table in (Certificate, Device, EstPending, AuditEntry, OutboxEvent)
            }
            used = select(func.count()).where(EstCredential.used_at.is_not(None))
            counts["credentials_used"] = await session.scalar(used)
        return counts

    async def recorded(self, cert: x509.Certificate) -> Certificate:
        from certfleet.pki.keys import cert_sha256
        from certfleet.store import certificates

        async with self.store.transaction() as session:
            return await certificates.get_certificate(session, cert_sha256(cert))

    def verify(self, cert: x509.Certificate, factory: str = "acme") -> None:
        """openssl verify of an issued device cert against the factory root."""
        path = self.tmp / f"issued-{cert.serial_number:x}.crt"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        done = subprocess.run(
            [
                "openssl",
                "verify",
                "-CAfile",
                str(self.root(factory)),
                "-untrusted",
                str(self.chain_file(factory)),
                "-purpose",
                "sslclient",
                str(path),
            ],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0 and done.stdout.strip().endswith(": OK"), done.stderr


def make_csr(
    key: ec.EllipticCurvePrivateKey,
    *,
    cn: str | None = None,
    subject: x509.Name | None = None,
    sans: list[x509.GeneralName] | None = None,
    challenge: str | None = None,
    hash_algorithm: hashes.HashAlgorithm | None = None,
) -> bytes:
    """DER PKCS#10 for `key`: subject CN=`cn` unless `subject` is given."""
    if subject is None:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn or str(uuid.uuid4()))])
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if challenge is not None:
        builder = builder.add_attribute(
            x509.oid.AttributeOID.CHALLENGE_PASSWORD, challenge.encode()
        )
    csr = builder.sign(key, hash_algorithm or hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER)


async def build_env(db_url: str, tmp_path: Path) -> EstEnv:
    """Two factories in one store, their authorities loaded, no server yet."""
    names = ServerNames(gateway_dns=["localhost"], gateway_ip=["127.0.0.1"])
    pki = {name: tmp_path / f"pki-{name}" for name in FACTORIES}
    for name, folder in pki.items():
        await pki_admin.create_factory(db_url, folder, name, names)
    store = await open_store(db_url)
    env = EstEnv(db_url, store, tmp_path, pki)
    async with store.transaction() as session:
        for name, folder in pki.items():
            env.authorities[name] = await load_authority(session, name, folder)
    return env


@contextlib.asynccontextmanager
async def running_env(db_url: str, tmp_path: Path) -> AsyncIterator[EstEnv]:
    """An EST server (TLS, default policy, label 'acme' by default) over two factories."""
    env = await build_env(db_url, tmp_path)
    await env.serve()
    try:
        yield env
    finally:
        await env.stop()
        await env.store.close()


async def run_shell(
    command: str, cwd: Path | None = None, timeout: float = 60
) -> tuple[int, bytes, str]:
    """Run a shell pipeline without blocking the event loop the server runs on."""
    process = await asyncio.create_subprocess_shell(
        command,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LC_ALL": "C"},
        executable=shutil.which("bash"),
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    return process.returncode, out, err.decode(errors="replace")
