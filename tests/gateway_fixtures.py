"""The device gateway on loopback TLS for tests, next to the EST server, over two factories.

`running_gateway` gives a `GatewayEnv` whose gateway serves factory 'acme'
with client certificates optional (as `certfleet server` will), trusting
every CA of the store at the TLS layer like the server does, so that refusals
come from the app with a reason. `env.serve()` (from EstEnv) adds the EST
server on another port for rotations that renew through EST.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import socket
import ssl
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import func, select

from certfleet.fleet import pki_admin
from certfleet.gateway.app import make_gateway_app
from certfleet.gateway.policy import GatewayPolicy
from certfleet.gateway.service import GatewayService
from certfleet.pki import profiles
from certfleet.pki.hierarchy import ServerNames
from certfleet.pki.keys import generate_private_key
from certfleet.pki.pki_dir import PkiDir
from certfleet.store import cas, devices, open_store
from certfleet.store.authorities import load_authority
from certfleet.store.issued import record_device_certificate
from certfleet.store.schema import (
    AuditEntry,
    Certificate,
    ConfigFile,
    ConfigLog,
    DenylistEntry,
    Device,
    OutboxEvent,
    RegisteredVia,
    Update,
    UpdateEvent,
)

from .est_fixtures import FACTORIES, DeviceId, EstEnv, Reply, Server

COUNTED = (
    Device,
    Certificate,
    DenylistEntry,
    ConfigFile,
    ConfigLog,
    Update,
    UpdateEvent,
    OutboxEvent,
    AuditEntry,
)


@dataclass
class GatewayEnv(EstEnv):
    gateway: Server | None = None
    service: GatewayService | None = None
    served: list[str] = field(default_factory=lambda: ["acme"])

    # -- the gateway -------------------------------------------------------------------

    async def serve_gateway(self, stack: str = "stdlib", **policy_fields: Any) -> Server:
        """(Re)start the gateway with a policy made of `policy_fields`."""
        await self.stop_gateway()
        authorities = {name: self.authorities[name] for name in self.served}
        self.service = GatewayService(self.store, authorities, GatewayPolicy(**policy_fields))
        runner = web.AppRunner(make_gateway_app(self.service), access_log=None)
        await runner.setup()
        listener = None
        if stack == "openssl4":
            from certfleet.tls import server_context, start_tls_server

            context = server_context(
                self.gateway_pem("crt"),
                self.gateway_pem("key"),
                self.trusted_cas(),
                require_client_cert=False,
            )
            listener = await start_tls_server(runner.server, "127.0.0.1", 0, context)
            port = listener.sockets[0].getsockname()[1]
        else:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            await web.SockSite(runner, sock, ssl_context=self.gateway_tls()).start()
        self.gateway = Server(runner, port, None, True, listener)  # type: ignore[arg-type]
        return self.gateway

    async def stop_gateway(self) -> None:
        if self.gateway is not None:
            if self.gateway.listener is not None:
                self.gateway.listener.close()
            await self.gateway.runner.cleanup()
            self.gateway = None

    def gateway_pem(self, suffix: str) -> Path:
        return self.pki["acme"] / f"gateway-tls.{suffix}"

    def trusted_cas(self) -> list[x509.Certificate]:
        stems = ("root", "online-ca", "local-ca-1")
        return [
            x509.load_pem_x509_certificate((folder / f"{stem}.crt").read_bytes())
            for folder in self.pki.values()
            for stem in stems
        ]

    def gateway_tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.gateway_pem("crt"), self.gateway_pem("key"))
        context.verify_mode = ssl.CERT_OPTIONAL
        for folder in self.pki.values():
            for stem in ("root", "online-ca", "local-ca-1"):
                context.load_verify_locations(folder / f"{stem}.crt")
        return context

    def gateway_url(self, path: str, port: int | None = None) -> str:
        if port is None:
            assert self.gateway is not None
            port = self.gateway.port
        return f"https://127.0.0.1:{port}{path}"

    async def call(
        self,
        method: str,
        path: str,
        *,
        device: DeviceId | None = None,
        json_body: Any = None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        port: int | None = None,
    ) -> Reply:
        """One request to the gateway (or one on `port`) on a new connection, as a device would."""
        sent = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body).encode()
            sent.setdefault("Content-Type", "application/json")
        connector = aiohttp.TCPConnector(ssl=self.client_tls(device), force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.request(
                method, self.gateway_url(path, port), data=body, headers=sent
            ) as response:
                return Reply(response.status, dict(response.headers), await response.read())

    # -- devices -----------------------------------------------------------------------

    def issue(
        self,
        device_uuid: str,
        key: ec.EllipticCurvePrivateKey | Any,
        *,
        factory: str = "acme",
        ca: str = "online-ca",
        now: dt.datetime | None = None,
        validity: dt.timedelta = profiles.YEAR,
        subject: x509.Name | None = None,
    ) -> x509.Certificate:
        """A device certificate for `key` signed by `ca` of `factory` (not recorded)."""
        folder = PkiDir(self.pki[factory])
        ca_cert = folder.read_cert(ca)
        if subject is None:
            issuer = profiles.Issuer.of(ca_cert)
            builder = profiles.device(device_uuid, factory, key.public_key(), issuer, validity, now)
        else:
            start = now or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
            builder = (
                x509.CertificateBuilder()
                .subject_name(subject)
                .issuer_name(ca_cert.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(start)
                .not_valid_after(start + validity)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(
                    x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
                    critical=False,
                )
            )
        return folder.load_signer(f"file:{ca}.key").sign_certificate(builder)

    async def record(
        self, device: DeviceId, *, ca: str = "online-ca", make_current: bool = True
    ) -> Certificate:
        """Record a device's certificate as issued by `ca` (as registration or EST would)."""
        factory_id = await self.factory_id(device.factory)
        async with self.store.transaction() as session:
            ca_row = await cas.get_ca_by_name(session, factory_id, ca)
            return await record_device_certificate(
                session,
                device.cert,
                device_uuid=device.uuid,
                factory_id=factory_id,
                issuer_ca_id=ca_row.id,
                request="test:setup",
                registered_via=RegisteredVia.ONLINE,
                make_current=make_current,
            )

    async def offline_device(self, factory: str = "acme", ca: str = "local-ca-1") -> DeviceId:
        """A device with a certificate from an offline CA, not yet known to the store."""
        device_uuid = str(uuid.uuid4())
        key = generate_private_key()
        cert = self.issue(device_uuid, key, factory=factory, ca=ca)
        return self.save_device(device_uuid, factory, key, cert)

    async def renewed(
        self, device: DeviceId, *, key: Any = None, ca: str = "online-ca", record: bool = False
    ) -> DeviceId:
        """The same device with a new key and certificate (recorded as EST would, if asked)."""
        key = key or generate_private_key()
        cert = self.issue(device.uuid, key, factory=device.factory, ca=ca)
        renewed = self.save_device(device.uuid, device.factory, key, cert)
        if record:
            await self.record(renewed, ca=ca, make_current=False)
        return renewed

    async def device_row(self, device_uuid: str) -> Device:
        async with self.store.transaction() as session:
            return await devices.get_device(session, device_uuid, include_deleted=True)

    async def set_group(self, device_uuid: str, group: str) -> None:
        async with self.store.transaction() as session:
            row = await devices.get_device(session, device_uuid)
            row.group_name = group

    async def fleet(self, action: Any, *args: Any, **kwargs: Any) -> Any:
        """Run an operator function (`certfleet.fleet`) that opens its own store on db_url.

        Opening a second engine on a SQLite file opens and closes the file, and
        closing any descriptor of a file drops every POSIX lock this process holds
        on it, so this process's pooled connections lose their shared lock and a
        later `certfleet` subprocess may delete the WAL under them. Their pool is
        emptied afterwards so they reconnect with fresh locks.
        """
        try:
            return await action(self.db_url, *args, **kwargs)
        finally:
            if self.db_url.startswith("sqlite"):
                await self.store.engine.dispose()

    # -- what is stored ----------------------------------------------------------------

    async def counts(self) -> dict[str, int]:
        """Rows that a refused request must not add."""
        async with self.store.transaction() as session:
            counts = {
                table.__tablename__: await session.scalar(select(func.count()).select_from(table))
                for table in COUNTED
            }
            counts["locked"] = await session.scalar(
                select(func.count()).where(Device.config_locked.is_(True))
            )
            counts["next_keys"] = await session.scalar(
                select(func.count()).where(Device.next_pubkey_sha256.is_not(None))
            )
        return counts

    async def events(self, topic: str | None = None, device_uuid: str | None = None) -> list:
        query = select(OutboxEvent).order_by(OutboxEvent.id)
        if topic is not None:
            query = query.where(OutboxEvent.topic == topic)
        if device_uuid is not None:
            query = query.where(OutboxEvent.device_uuid == device_uuid)
        async with self.store.transaction() as session:
            return list(await session.scalars(query))


def subject_of(device_uuid: str, factory: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, device_uuid),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, factory),
        ]
    )


async def build_gateway_env(db_url: str, tmp_path: Path) -> GatewayEnv:
    """Two factories in one store and their authorities; no server yet."""
    names = ServerNames(gateway_dns=["localhost"], gateway_ip=["127.0.0.1"])
    pki = {name: tmp_path / f"pki-{name}" for name in FACTORIES}
    for name, folder in pki.items():
        await pki_admin.create_factory(db_url, folder, name, names)
    store = await open_store(db_url)
    env = GatewayEnv(db_url, store, tmp_path, pki)
    async with store.transaction() as session:
        for name, folder in pki.items():
            env.authorities[name] = await load_authority(session, name, folder)
    return env


@contextlib.asynccontextmanager
async def running_gateway(
    db_url: str, tmp_path: Path, **policy_fields: Any
) -> AsyncIterator[GatewayEnv]:
    """A gateway (stdlib TLS, factory 'acme') over two factories; EST on demand."""
    env = await build_gateway_env(db_url, tmp_path)
    await env.serve_gateway(**policy_fields)
    try:
        yield env
    finally:
        await env.stop_gateway()
        await env.stop()
        await env.store.close()
