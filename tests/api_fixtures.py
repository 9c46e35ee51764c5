"""A real `certfleet server` with the admin API on loopback TLS, a factory PKI, API tokens of
every scope, and helpers to seed devices through the store and call the API over HTTPS."""

from __future__ import annotations

import datetime as dt
import hashlib
import http.client
import json
import secrets
import ssl
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import func, select

from certfleet.fleet import tokens_admin
from certfleet.pki.csr import name_text
from certfleet.pki.keys import cert_sha256
from certfleet.store import Store, cas, certificates, devices, factories, open_store
from certfleet.store.schema import (
    ApiToken,
    AuditEntry,
    Ca,
    CaKind,
    Campaign,
    Certificate,
    ConfigFile,
    ConfigLog,
    DenylistEntry,
    Device,
    OutboxEvent,
    RegisteredVia,
    utcnow,
)

from .cli_run import certfleet
from .server_process import ServerProcess, free_port

NAMES = ["--gateway-dns", "localhost", "--gateway-ip", "127.0.0.1"]
SCOPES = ("read", "rotate", "pki-admin", "register")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class ApiEnv:
    """The server under test and what the test may need of it."""

    pki: Path
    db_url: str
    store: Store
    server: ServerProcess | None = None
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        assert self.server is not None
        return f"https://127.0.0.1:{self.server.api_port}"

    @property
    def gateway_url(self) -> str:
        assert self.server is not None
        return f"https://127.0.0.1:{self.server.gateway_port}"

    def start(self, *extra: str) -> None:
        port = free_port()
        self.server = ServerProcess(
            "--pki",
            str(self.pki),
            "--database",
            self.db_url,
            "--listen-est",
            f"127.0.0.1:{port}",
            *extra,
            port=port,
        )

    def stop(self) -> str:
        """Stop the server; its output, which must hold no token."""
        assert self.server is not None
        code, out = self.server.stop()
        self.server = None
        assert code == 0, out
        for token in self.tokens.values():
            assert token not in out, "a token reached the server log"
        return out

    def call(
        self,
        method: str,
        path: str,
        *,
        scope: str | None = "pki-admin",
        token: str | None = None,
        body: Any = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """One HTTPS request to the API, trusting the factory root, on a new connection."""
        assert self.server is not None
        sent = dict(headers or {})
        token = token or (self.tokens[scope] if scope else None)
        if token:
            sent["Authorization"] = f"Bearer {token}"
        if body is not None:
            raw = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        context = ssl.create_default_context(cafile=str(self.pki / "root.crt"))
        connection = http.client.HTTPSConnection(
            "127.0.0.1", self.server.api_port, context=context, timeout=30
        )
        try:
            connection.request(method, path, body=raw, headers=sent)
            response = connection.getresponse()
            return Answer(response.status, dict(response.headers), response.read())
        finally:
            connection.close()

    async def snapshot(self) -> dict[str, Any]:
        """What a refused request must leave as it was."""
        async with self.store.transaction() as session:
            counts: dict[str, Any] = {
                table.__tablename__: await session.scalar(select(func.count()).select_from(table))
                for table in (
                    Device,
                    Certificate,
                    DenylistEntry,
                    OutboxEvent,
                    AuditEntry,
                    ConfigFile,
                    ConfigLog,
                    Campaign,
                )
            }
            deleted = select(func.count()).where(Device.deleted_at.is_not(None))
            counts["deleted"] = await session.scalar(deleted)
            rows = await session.execute(select(ApiToken.id, ApiToken.last_used_at))
            counts["api_tokens"] = sorted(tuple(row) for row in rows)
        return counts

    async def factory_id(self) -> int:
        async with self.store.transaction() as session:
            return (await factories.get_factory(session, "acme")).id


def make_pki(tmp_path: Path, db_url: str) -> Path:
    folder = tmp_path / "pki"
    certfleet(
        "keys", "ca", "create", str(folder), "--factory", "acme", *NAMES, "--database", db_url
    )
    if db_url.startswith("postgresql"):
        certfleet("db", "upgrade", "--database", db_url, "--pki", str(folder))
    return folder


async def make_tokens(store: Store) -> dict[str, str]:
    """One token per scope, as `certfleet tokens create --scope S` makes them."""
    made = {}
    for scope in SCOPES:
        created = await tokens_admin.create_token(
            store, f"test-{scope}", [scope], dt.timedelta(days=1)
        )
        made[scope] = created.token
    return made


@pytest.fixture
async def api_env(tmp_path, db_url) -> AsyncIterator[ApiEnv]:
    """A factory, tokens of every scope and a running server (2 workers) with the API."""
    pki = make_pki(tmp_path, db_url)
    store = await open_store(db_url)
    env = ApiEnv(pki, db_url, store)
    try:
        env.tokens = await make_tokens(store)
        yield env
    finally:
        if env.server is not None:
            env.stop()
        await store.close()


# -- synthetic data through the store ----------------------------------------------------------


def fake_cert_fields(not_after: dt.datetime) -> dict[str, Any]:
    """Certificate columns for a device certificate the store only lists."""
    sha = secrets.token_hex(32)
    return {
        "serial": secrets.token_hex(16),
        "sha256": sha,
        "subject": "CN=synthetic",
        "pubkey_sha256": hashlib.sha256(sha.encode()).hexdigest(),
        "not_before": not_after - dt.timedelta(days=365),
        "not_after": not_after,
        "cert_pem": "synthetic",
    }


async def add_device(
    store: Store,
    *,
    not_after: dt.datetime | None,
    group: str | None = "lab",
    last_seen: dt.datetime | None = None,
    issuer_ca_id: int | None = None,
    deleted: bool = False,
    locked: bool = False,
) -> str:
    """A device with a current certificate expiring at ``not_after`` (None: no certificate)."""
    device_uuid = str(uuid.uuid4())
    async with store.transaction() as session:
        factory = await factories.get_factory(session, "acme")
        device = await devices.add_device(
            session,
            device_uuid,
            factory_id=factory.id,
            registered_via=RegisteredVia.ONLINE,
            group_name=group,
        )
        if not_after is not None:
            cert = await certificates.add_certificate(
                session,
                **fake_cert_fields(not_after),
                device_uuid=device_uuid,
                issuer_ca_id=issuer_ca_id,
            )
            device.current_cert_id = cert.id
        device.config_locked = locked
        if last_seen is not None:
            device.last_seen_at = last_seen
        if deleted:
            device.deleted_at = utcnow()
        await session.flush()
    return device_uuid


async def add_short_ca(store: Store, name: str, not_after: dt.datetime) -> Ca:
    """A local device CA (a real certificate) that expires at ``not_after``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "acme"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(utcnow() - dt.timedelta(days=1))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    async with store.transaction() as session:
        factory = await factories.get_factory(session, "acme")
        return await cas.add_ca(
            session,
            factory_id=factory.id,
            name=name,
            kind=CaKind.LOCAL,
            cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
            sha256=cert_sha256(cert),
            subject=name_text(cert.subject),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
        )


class Cli:
    """The same `certfleet` command in local mode and against the API; no token may show."""

    def __init__(self, env: ApiEnv) -> None:
        self.env = env
        self.local = ["--pki", str(env.pki), "--database", env.db_url]
        self.remote = ["--server", env.api_url, "--trust", str(env.pki / "root.crt")]

    def run(self, *args: str, remote: bool, scope: str = "rotate", expect: int = 0):
        extra = self.remote if remote else self.local
        token = {"CERTFLEET_TOKEN": self.env.tokens[scope]}
        done = certfleet(*args, *extra, env=token, expect=expect)
        for secret in self.env.tokens.values():
            assert secret not in done.stdout + done.stderr, "a token was printed"
        return done

    def json(self, *args: str, remote: bool, scope: str = "rotate") -> Any:
        """What the command prints with --json, parsed."""
        return json.loads(self.run(*args, "--json", remote=remote, scope=scope).stdout)

    def both_json(self, *args: str) -> Any:
        """The JSON answer, checked equal in both modes (remote with a read token)."""
        local = self.json(*args, remote=False)
        remote = self.json(*args, remote=True, scope="read")
        assert local == remote, args
        return local
