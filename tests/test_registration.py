"""Online registration end to end: `POST /register` on loopback TLS, the real agent CLI,
real SQLite and PostgreSQL stores, SoftHSM2 tokens and the `certfleet tokens` commands."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import re
import socket
import ssl
import subprocess
import tomllib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pkcs11 import Attribute, ObjectClass
from sqlalchemy import func, select

from certfleet.events.names import DEVICE_REGISTERED
from certfleet.fleet import pki_admin, tokens_admin
from certfleet.gateway.registration import MAX_BODY_BYTES, registration_routes
from certfleet.pki.keys import cert_sha256, generate_private_key
from certfleet.pki.pkcs11_signer import Pkcs11Ref, Pkcs11Signer, open_token_session
from certfleet.store import audit, certificates, devices, outbox, tokens
from certfleet.store.schema import (
    ApiToken,
    AuditEntry,
    Certificate,
    Device,
    OutboxEvent,
    metadata,
    utcnow,
)

from .cli_run import BIN, certfleet
from .est_fixtures import EstEnv, build_env, make_csr
from .pki_checks import mode

TOKEN_ENV = "CERTFLEET_REGISTER_TOKEN"


# -- the gateway under test ------------------------------------------------------------------


@dataclass
class Gateway:
    """`registration_routes` alone in an aiohttp app on 127.0.0.1 over TLS."""

    env: EstEnv
    runner: web.AppRunner
    port: int
    tokens: list[str]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def store(self):
        return self.env.store

    def pki(self, factory: str = "acme") -> Path:
        return self.env.pki[factory]

    async def token(self, name: str = "line-3", scopes=("register",), **kwargs) -> str:
        """A new operator token, made the way `certfleet tokens create` makes it."""
        expires_in = kwargs.get("expires_in", dt.timedelta(days=1))
        created = await tokens_admin.create_token(self.store, name, list(scopes), expires_in)
        self.tokens.append(created.token)
        return created.token

    async def agent(self, *args: str, token: str | None, expect: int = 0, **env: str):
        """`certfleet-agent register --server URL ARGS` as a real process."""
        full_env = {**os.environ, "COLUMNS": "200", **env}
        full_env.pop(TOKEN_ENV, None)
        if token is not None:
            full_env[TOKEN_ENV] = token
        command = [str(BIN / "certfleet-agent"), "register", "--server", self.url, *args]
        done = await asyncio.to_thread(
            subprocess.run, command, capture_output=True, text=True, timeout=120, env=full_env
        )
        assert done.returncode == expect, f"exit {done.returncode}: {done.stdout} {done.stderr}"
        for secret in self.tokens:
            assert secret not in done.stdout + done.stderr
        return done

    async def post(
        self, body: object = None, *, token: str | None = None, **kwargs
    ) -> tuple[int, dict[str, str], str]:
        """One request as a device would send it; `data` sends raw bytes instead of JSON."""
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if "data" not in kwargs:
            kwargs["json"] = body
        context = ssl.create_default_context(cafile=self.pki() / "root.crt")
        connector = aiohttp.TCPConnector(ssl=context, force_close=True)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.post(f"{self.url}/register", headers=headers, **kwargs) as response,
        ):
            return response.status, dict(response.headers), await response.text()

    async def snapshot(self) -> dict[str, object]:
        """What a refused request must leave as it was."""
        async with self.store.transaction() as session:
            counts = {
                table.__tablename__: await session.scalar(select(func.count()).select_from(table))
                for table in (Device, Certificate, OutboxEvent, AuditEntry)
            }
            rows = await session.execute(
                select(ApiToken.id, ApiToken.last_used_at, ApiToken.revoked_at)
            )
            counts["api_tokens"] = sorted(tuple(row) for row in rows)
        return counts

    async def assert_token_stored_nowhere(self) -> None:
        async with self.store.transaction() as session:
            for table in metadata.sorted_tables:
                for row in await session.execute(select(table)):
                    for secret in self.tokens:
                        assert secret.removeprefix("cft_") not in repr(tuple(row)), table.name
        if self.env.db_url.startswith("sqlite"):
            database = self.env.db_url.removeprefix("sqlite:///")
            for suffix in ("", "-wal"):
                with contextlib.suppress(FileNotFoundError):
                    data = Path(database + suffix).read_bytes()
                    for secret in self.tokens:
                        assert secret.encode() not in data


def _server_tls(pki: Path) -> ssl.SSLContext:
    """The gateway's TLS: its own certificate, client certificates optional."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(pki / "gateway-tls.crt", pki / "gateway-tls.key")
    context.verify_mode = ssl.CERT_OPTIONAL
    context.load_verify_locations(pki / "root.crt")
    return context


@contextlib.asynccontextmanager
async def serving(env: EstEnv, tls_of: str = "acme") -> AsyncIterator[Gateway]:
    """Serve acme's registration with the TLS certificate of factory `tls_of`."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = web.Application()
    app.add_routes(
        registration_routes(
            env.store, {"acme": env.authorities["acme"]}, gateway_url=f"https://127.0.0.1:{port}"
        )
    )
    runner = web.AppRunner(app)  # with aiohttp's access log, as a server would run it
    await runner.setup()
    await web.SockSite(runner, sock, ssl_context=_server_tls(env.pki[tls_of])).start()
    try:
        yield Gateway(env, runner, port, [])
    finally:
        await runner.cleanup()


@pytest.fixture
async def env(db_url, tmp_path) -> AsyncIterator[EstEnv]:
    """Factories acme and globex in one store; the gateway serves acme only."""
    built = await build_env(db_url, tmp_path)
    try:
        yield built
    finally:
        await built.store.close()


@pytest.fixture
async def gw(env, caplog) -> AsyncIterator[Gateway]:
    caplog.set_level(logging.INFO)
    async with serving(env) as gateway:
        yield gateway
        for secret in gateway.tokens:
            assert secret not in caplog.text, "a token reached the server log"


# -- checks ---------------------------------------------------------------------------------


def openssl_verify(root: Path, chain: Path, cert: Path) -> None:
    done = subprocess.run(
        ["openssl", "verify", "-CAfile", str(root), "-untrusted", str(chain), str(cert)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith(": OK"), done.stderr


async def check_registered(
    gw: Gateway, device_uuid: str, cert: x509.Certificate, group: str | None, storage: str
) -> None:
    """Device, current certificate, audit row and event: all stored, all consistent."""
    async with gw.store.transaction() as session:
        device = await devices.get_device(session, device_uuid)
        row = await certificates.get_certificate(session, cert_sha256(cert))
        entries = await audit.list_audit(session, target=device_uuid)
        events = await outbox.latest_events(
            session, topic=DEVICE_REGISTERED, device_uuid=device_uuid
        )
    assert device.group_name == group and device.registered_via == "online"
    assert device.current_cert_id == row.id and row.device_uuid == device_uuid
    assert row.issuer_ca_id == gw.env.authorities["acme"].issuing_ca_id
    assert row.issued_by_request.startswith("gateway:register:")
    [entry] = entries
    assert entry.actor == "token:line-3" and entry.action == "device.register"
    assert entry.details["serial"] == f"{cert.serial_number:x}"
    [event] = events
    assert event.payload["uuid"] == device_uuid and event.payload["group"] == group
    assert event.payload["factory"] == "acme" and event.payload["key_storage"] == storage
    assert cert.issuer == gw.env.authorities["acme"].issuing_ca.subject
    assert cert.subject.rfc4514_string() == f"OU=acme,CN={device_uuid}"


def read_config(directory: Path) -> dict:
    config = tomllib.loads((directory / "sota.toml").read_text())
    assert Path(config["import"]["base_path"]) == directory
    assert config["import"]["tls_cacert_path"] == "root.crt"
    assert config["tls"]["ca_source"] == "file"
    return config


# -- registering ----------------------------------------------------------------------------


async def test_register_with_a_file_key(gw):
    token = await gw.token()
    device_dir = gw.env.tmp / "device"
    done = await gw.agent(
        "--factory",
        "acme",
        "--group",
        "lab",
        "--dir",
        str(device_dir),
        "--trust",
        str(gw.pki() / "root.crt"),
        token=token,
    )
    device_uuid = done.stdout.strip()
    assert str(uuid.UUID(device_uuid)) == device_uuid
    assert mode(device_dir / "pkey.pem") == 0o600
    for name in ("client.pem", "root.crt", "sota.toml"):
        assert mode(device_dir / name) == 0o644, name
    assert (device_dir / "root.crt").read_bytes() == (gw.pki() / "root.crt").read_bytes()
    openssl_verify(device_dir / "root.crt", gw.pki() / "online-ca.crt", device_dir / "client.pem")

    cert = x509.load_pem_x509_certificate((device_dir / "client.pem").read_bytes())
    key = serialization.load_pem_private_key((device_dir / "pkey.pem").read_bytes(), None)
    assert cert.public_key() == key.public_key()
    await check_registered(gw, device_uuid, cert, "lab", "file")

    config = read_config(device_dir)
    assert config["tls"] == {
        "server": gw.url,
        "ca_source": "file",
        "pkey_source": "file",
        "cert_source": "file",
    }
    base = Path(config["import"]["base_path"])
    assert base / config["import"]["tls_pkey_path"] == device_dir / "pkey.pem"
    assert base / config["import"]["tls_clientcert_path"] == device_dir / "client.pem"
    assert "p11" not in config
    await gw.assert_token_stored_nowhere()


async def test_register_with_a_key_inside_softhsm(gw, softhsm_token):
    token = await gw.token()
    device_dir = gw.env.tmp / "hsm-device"
    hsm = [
        "--hsm-module",
        softhsm_token.module,
        "--hsm-token-label",
        softhsm_token.label,
        "--hsm-key-id",
        "01",
        "--hsm-cert-id",
        "03",
    ]
    args = ["--factory", "acme", "--dir", str(device_dir), "--trust", str(gw.pki() / "root.crt")]
    pin = {"CERTFLEET_HSM_PIN": softhsm_token.pin}
    done = await gw.agent(*args, *hsm, token=token, **pin)
    device_uuid = done.stdout.strip()
    assert not (device_dir / "pkey.pem").exists() and not (device_dir / "client.pem").exists()
    assert mode(device_dir / "root.crt") == 0o644 and mode(device_dir / "sota.toml") == 0o644

    ref = Pkcs11Ref(softhsm_token.module, softhsm_token.label, key_id=b"\x01")
    token_key = Pkcs11Signer(ref, softhsm_token.pin)
    session = open_token_session(ref, softhsm_token.pin).session
    [private] = session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})
    assert private[Attribute.SENSITIVE] and not private[Attribute.EXTRACTABLE]
    [stored] = session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE})
    assert stored[Attribute.ID] == b"\x03"
    cert = x509.load_der_x509_certificate(stored[Attribute.VALUE])
    assert cert.public_key() == token_key.public_key
    (gw.env.tmp / "hsm.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    openssl_verify(device_dir / "root.crt", gw.pki() / "online-ca.crt", gw.env.tmp / "hsm.pem")
    await check_registered(gw, device_uuid, cert, None, "pkcs11")

    config = read_config(device_dir)
    assert config["tls"]["pkey_source"] == "pkcs11" and config["tls"]["cert_source"] == "pkcs11"
    assert config["p11"] == {
        "module": softhsm_token.module,
        "label": softhsm_token.label,
        "tls_pkey_id": "01",
        "tls_clientcert_id": "03",
    }
    assert softhsm_token.pin not in (device_dir / "sota.toml").read_text()

    # The certificate slot is taken now: a second registration needs --force.
    again = gw.env.tmp / "hsm-again"
    refused = await gw.agent(
        "--factory",
        "acme",
        "--dir",
        str(again),
        "--trust",
        str(gw.pki() / "root.crt"),
        *hsm,
        token=token,
        expect=2,
        **pin,
    )
    assert "already holds a certificate with id 03" in refused.stderr
    forced = await gw.agent(
        "--factory",
        "acme",
        "--dir",
        str(again),
        "--trust",
        str(gw.pki() / "root.crt"),
        "--force",
        *hsm,
        token=token,
        **pin,
    )
    [stored] = session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE})
    replaced = x509.load_der_x509_certificate(stored[Attribute.VALUE])
    assert replaced.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == (
        forced.stdout.strip()
    )


async def test_first_contact_needs_a_flag_and_checks_the_gateway(gw):
    token = await gw.token()
    before = await gw.snapshot()
    device_dir = gw.env.tmp / "first"
    refused = await gw.agent("--factory", "acme", "--dir", str(device_dir), token=token, expect=2)
    assert "--trust" in refused.stderr and "--insecure-first-contact" in refused.stderr
    assert await gw.snapshot() == before and not device_dir.exists()

    done = await gw.agent(
        "--factory", "acme", "--dir", str(device_dir), "--insecure-first-contact", token=token
    )
    assert "first contact: trusting root" in done.stderr and "SHA-256" in done.stderr
    assert (device_dir / "root.crt").read_bytes() == (gw.pki() / "root.crt").read_bytes()
    await check_registered(
        gw,
        done.stdout.strip(),
        x509.load_pem_x509_certificate((device_dir / "client.pem").read_bytes()),
        None,
        "file",
    )


async def test_first_contact_refuses_a_gateway_that_is_not_under_the_returned_root(env, caplog):
    # A gateway presenting another factory's TLS certificate: what a relaying proxy looks like.
    async with serving(env, tls_of="globex") as gw:
        token = await gw.token()
        device_dir = gw.env.tmp / "proxied"
        done = await gw.agent(
            "--factory",
            "acme",
            "--dir",
            str(device_dir),
            "--insecure-first-contact",
            token=token,
            expect=2,
        )
    assert "does not chain to the root it returned" in done.stderr
    assert "Nothing was written" in done.stderr and "ask the operator to delete" in done.stderr
    assert not device_dir.exists()


async def test_a_wrong_trust_anchor_sends_nothing(gw):
    token = await gw.token()
    before = await gw.snapshot()
    done = await gw.agent(
        "--factory",
        "acme",
        "--dir",
        str(gw.env.tmp / "d"),
        "--trust",
        str(gw.pki("globex") / "root.crt"),
        token=token,
        expect=2,
    )
    assert "is not trusted" in done.stderr and "check --trust" in done.stderr
    assert await gw.snapshot() == before


async def test_a_directory_with_a_registration_needs_force(gw):
    token = await gw.token()
    device_dir = gw.env.tmp / "device"
    args = ["--factory", "acme", "--dir", str(device_dir), "--trust", str(gw.pki() / "root.crt")]
    first = (await gw.agent(*args, token=token)).stdout.strip()
    before = await gw.snapshot()
    refused = await gw.agent(*args, token=token, expect=2)
    assert "already holds a registration (sota.toml, client.pem, pkey.pem)" in refused.stderr
    assert "--force" in refused.stderr
    assert await gw.snapshot() == before
    second = (await gw.agent(*args, "--force", token=token)).stdout.strip()
    assert second != first
    cert = x509.load_pem_x509_certificate((device_dir / "client.pem").read_bytes())
    assert str(cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value) == second


async def test_a_uuid_registers_once(gw):
    token = await gw.token()
    device_uuid = str(uuid.uuid4())
    trust = ["--trust", str(gw.pki() / "root.crt"), "--uuid", device_uuid, "--factory", "acme"]
    await gw.agent(*trust, "--dir", str(gw.env.tmp / "a"), token=token)
    before = await gw.snapshot()
    done = await gw.agent(*trust, "--dir", str(gw.env.tmp / "b"), token=token, expect=2)
    assert (
        f"(409): device {device_uuid} is already registered; delete it first or use another uuid"
    ) in done.stderr
    assert await gw.snapshot() == before
    assert not (gw.env.tmp / "b").exists()


async def test_the_same_uuid_at_the_same_moment_registers_once(gw):
    token = await gw.token()
    device_uuid = str(uuid.uuid4())
    bodies = [request_body(cn=device_uuid) for _ in range(4)]
    replies = await asyncio.gather(*(gw.post(body, token=token) for body in bodies))
    assert sorted(status for status, _, _ in replies) == [201, 409, 409, 409]
    async with gw.store.transaction() as session:
        assert len(await certificates.list_device_certificates(session, device_uuid)) == 1


async def test_answer_is_json_with_the_identity_and_no_cache(gw):
    token = await gw.token()
    device_uuid = str(uuid.uuid4())
    status, headers, text = await gw.post(request_body(cn=device_uuid, group="g1"), token=token)
    assert status == 201, text
    assert headers["Cache-Control"] == "no-store"
    answer = json.loads(text)
    assert set(answer) == {"uuid", "client_pem", "root_pem", "ca_pem", "sota_toml"}
    assert answer["uuid"] == device_uuid
    ca = x509.load_pem_x509_certificate(answer["ca_pem"].encode())
    assert ca == gw.env.authorities["acme"].issuing_ca
    client = x509.load_pem_x509_certificate(answer["client_pem"].encode())
    client.verify_directly_issued_by(ca)
    config = tomllib.loads(answer["sota_toml"])
    assert config["import"]["base_path"] == "/var/sota"


async def test_a_disabled_online_ca_registers_nothing(gw):
    token = await gw.token()
    await pki_admin.disable_device_ca(gw.env.db_url, "online-ca", "acme")
    before = await gw.snapshot()
    status, _, text = await gw.post(request_body(), token=token)
    assert status == 503 and "online CA 'online-ca' of factory acme is disabled" in text
    assert await gw.snapshot() == before


async def test_a_deleted_device_stays_deleted(gw):
    token = await gw.token()
    device_uuid = str(uuid.uuid4())
    assert (await gw.post(request_body(cn=device_uuid), token=token))[0] == 201
    async with gw.store.transaction() as session:
        await devices.soft_delete_device(session, device_uuid)
    before = await gw.snapshot()
    status, _, text = await gw.post(request_body(cn=device_uuid), token=token)
    assert status == 409 and "was deleted; a deleted uuid is never reused" in text
    assert await gw.snapshot() == before


async def test_inside_the_gateway_app_the_new_identity_is_accepted(env, caplog):
    """Mounted as an extra route of the device gateway, as `certfleet server` will do."""
    from certfleet.gateway.app import make_gateway_app
    from certfleet.gateway.service import GatewayService

    caplog.set_level(logging.INFO)
    acme = env.pki["acme"]
    context = _server_tls(acme)
    context.load_verify_locations(acme / "online-ca.crt")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"https://127.0.0.1:{sock.getsockname()[1]}"
    authorities = {"acme": env.authorities["acme"]}
    routes = registration_routes(env.store, authorities, gateway_url=url)
    app = make_gateway_app(GatewayService(env.store, authorities), extra_routes=routes)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.SockSite(runner, sock, ssl_context=context).start()
    try:
        gw = Gateway(env, runner, sock.getsockname()[1], [])
        device_dir = env.tmp / "device"
        args = ["--factory", "acme", "--dir", str(device_dir), "--trust", str(acme / "root.crt")]
        device_uuid = (await gw.agent(*args, token=await gw.token())).stdout.strip()
        status, headers, text = await gw.post(request_body(), token="cft_nope")
        assert status == 401 and headers["X-Certfleet-Error"] == "bad-token"
        [refusal] = [
            r for r in caplog.records if r.getMessage().startswith("gateway POST /register refused")
        ]
        assert headers["X-Request-ID"] in refusal.getMessage()

        client = ssl.create_default_context(cafile=device_dir / "root.crt")
        client.load_cert_chain(device_dir / "client.pem", device_dir / "pkey.pem")
        connector = aiohttp.TCPConnector(ssl=client, force_close=True)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(f"{url}/device") as response,
        ):
            assert response.status == 200, await response.text()
            assert device_uuid in await response.text()
        for secret in gw.tokens:
            assert secret not in caplog.text
    finally:
        await runner.cleanup()


# -- refusals -------------------------------------------------------------------------------


def csr_pem(der: bytes) -> str:
    return x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM).decode()


def request_body(cn: str | None = None, ou: str | None = None, **fields) -> dict:
    """A good registration body; `fields` replace or add parts of it."""
    cn = cn or str(uuid.uuid4())
    subject = [x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)]
    if ou:
        subject.append(x509.NameAttribute(x509.NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    der = make_csr(generate_private_key(), subject=x509.Name(subject))
    return {"csr": csr_pem(der), "factory": "acme", **fields}


def bad_signature() -> str:
    der = bytearray(make_csr(generate_private_key(), cn=str(uuid.uuid4())))
    der[-1] ^= 0x01  # the last byte of the signature's s
    return csr_pem(bytes(der))


def rsa_csr() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return csr_pem(make_csr(key, cn=str(uuid.uuid4())))


def pkcs11_body(**slots) -> dict:
    good = {"module": "/usr/lib/x.so", "token_label": "t", "key_id": "01", "cert_id": "03"}
    return request_body(key_storage="pkcs11", pkcs11={**good, **slots})


@dataclass
class Case:
    """One hostile request: how to send it, and the answer it must get."""

    status: int
    reason: str
    body: Callable[[], object] = request_body
    token: str = "good"  # good | none | unknown | expired | revoked | read-only
    headers: dict | None = None
    data: Callable[[], bytes] | None = None


CASES = {
    "no authorization": Case(401, "no Authorization header", token="none"),
    "basic auth": Case(
        401, "not a Bearer token", token="none", headers={"Authorization": "Basic dTpw"}
    ),
    "empty bearer": Case(
        401, "not a Bearer token", token="none", headers={"Authorization": "Bearer "}
    ),
    "unknown token": Case(401, "unknown API token", token="unknown"),
    "expired token": Case(401, "API token 'old' expired; create a new one", token="expired"),
    "revoked token": Case(401, "API token 'leaked' was revoked", token="revoked"),
    "token without register scope": Case(
        403, "API token 'reader' may not register devices (its scopes: read)", token="read-only"
    ),
    "malformed json": Case(400, "body is not valid JSON", data=lambda: b'{"csr": '),
    "not utf-8": Case(400, "body is not valid JSON", data=lambda: b"\xff\xfe{}"),
    "json array": Case(400, "body must be a JSON object", body=lambda: [request_body()]),
    "unknown field": Case(400, "unknown field 'groups'", body=lambda: request_body(groups="x")),
    "missing csr": Case(400, "field 'csr' is missing", body=lambda: {"factory": "acme"}),
    "missing factory": Case(
        400, "field 'factory' is missing", body=lambda: {"csr": request_body()["csr"]}
    ),
    "csr not a string": Case(
        400, "field 'csr' must be a non-empty string", body=lambda: request_body(csr=["x"])
    ),
    "csr not pem": Case(400, "must be a PEM request", body=lambda: request_body(csr="MIIB")),
    "csr broken pem": Case(
        400,
        "CSR is not valid PEM",
        body=lambda: request_body(
            csr="-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
        ),
    ),
    "csr bad signature": Case(
        400, "CSR signature does not verify", body=lambda: request_body(csr=bad_signature())
    ),
    "csr rsa key": Case(400, "CSR key refused", body=lambda: request_body(csr=rsa_csr())),
    "cn not a uuid": Case(
        400, "CSR CN 'pump-7' is not a device uuid", body=lambda: request_body(cn="pump-7")
    ),
    "cn uuid in capitals": Case(
        400,
        "must be written as",
        body=lambda: request_body(cn=str(uuid.uuid4()).upper()),
    ),
    "ou of another factory": Case(
        400, "CSR OU 'globex' differs from factory 'acme'", body=lambda: request_body(ou="globex")
    ),
    "another factory's name": Case(
        404,
        "this gateway registers devices of factory acme, not 'globex'",
        body=lambda: request_body(ou="globex", factory="globex"),
    ),
    "unknown factory": Case(404, "not 'initech'", body=lambda: request_body(factory="initech")),
    "group not a string": Case(
        400, "field 'group' must be a non-empty string", body=lambda: request_body(group=7)
    ),
    "group with a newline": Case(
        400, "field 'group' must be at most 128 printable", body=lambda: request_body(group="a\nb")
    ),
    "relative base path": Case(
        400, "must be an absolute path", body=lambda: request_body(base_path="sota")
    ),
    "unknown key storage": Case(
        400, "'key_storage' must be", body=lambda: request_body(key_storage="tpm")
    ),
    "pkcs11 without slots": Case(
        400, "needs field 'pkcs11'", body=lambda: request_body(key_storage="pkcs11")
    ),
    "slots without pkcs11": Case(
        400, "field 'pkcs11' needs", body=lambda: request_body(pkcs11={"key_id": "01"})
    ),
    "pkcs11 id not hex": Case(
        400, "pkcs11.key_id: bad PKCS#11 object id 'zz'", body=lambda: pkcs11_body(key_id="zz")
    ),
    "pkcs11 relative module": Case(
        400, "'module' must be an absolute path", body=lambda: pkcs11_body(module="softhsm.so")
    ),
    "pkcs11 unknown field": Case(
        400, "unknown field pkcs11.pin", body=lambda: pkcs11_body(pin="1234")
    ),
    "body over 1 MiB": Case(
        413,
        f"over the registration limit of {MAX_BODY_BYTES} bytes",
        data=lambda: b" " * (MAX_BODY_BYTES + 1),
    ),
}


async def _case_token(gw: Gateway, kind: str) -> str | None:
    if kind == "none":
        return None
    if kind == "good":
        return await gw.token()
    if kind == "unknown":
        return "cft_" + "x" * 43
    if kind == "read-only":
        return await gw.token("reader", ["read"])
    async with gw.store.transaction() as session:
        if kind == "expired":
            row, plain = await tokens.create_token(
                session, "old", scopes=["register"], expires_at=utcnow() - dt.timedelta(hours=1)
            )
        else:
            row, plain = await tokens.create_token(
                session, "leaked", scopes=["register"], expires_at=utcnow() + dt.timedelta(days=1)
            )
            await tokens.revoke_token(session, row.id)
    gw.tokens.append(plain)
    return plain


@pytest.mark.parametrize("name", list(CASES))
async def test_refusals_are_one_line_and_store_nothing(gw, caplog, name):
    case = CASES[name]
    token = await _case_token(gw, case.token)
    before = await gw.snapshot()
    kwargs = {"headers": case.headers or {}}
    if case.data is not None:
        kwargs["data"] = case.data()
    status, headers, text = await gw.post(case.body(), token=token, **kwargs)
    assert status == case.status, text
    assert case.reason in text
    assert text.endswith("\n") and text.count("\n") == 1
    assert headers["X-Certfleet-Error"] and headers["X-Request-ID"]
    if status == 401:
        assert headers["WWW-Authenticate"].startswith('Bearer realm="certfleet-gateway"')
    if status == 403:
        assert 'error="insufficient_scope", scope="register"' in headers["WWW-Authenticate"]
    assert await gw.snapshot() == before
    refusals = [
        r for r in caplog.records if r.getMessage().startswith("gateway POST /register refused")
    ]
    assert len(refusals) == 1 and refusals[0].levelno == logging.INFO
    assert case.reason in refusals[0].getMessage()
    assert headers["X-Request-ID"] in refusals[0].getMessage()
    await gw.assert_token_stored_nowhere()


async def test_a_chunked_body_over_the_limit_is_refused(gw):
    token = await gw.token()

    async def chunks():
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b" " * 65536

    before = await gw.snapshot()
    status, _, text = await gw.post(token=token, data=chunks())
    assert status == 413 and "over the registration limit" in text
    assert await gw.snapshot() == before


# -- `certfleet tokens` ---------------------------------------------------------------------


async def tokens_cli(gw: Gateway, *args: str, expect: int = 0):
    return await asyncio.to_thread(
        certfleet,
        "tokens",
        *args,
        "--pki",
        str(gw.pki()),
        "--database",
        gw.env.db_url,
        expect=expect,
    )


async def test_tokens_create_list_revoke_end_to_end(gw):
    done = await tokens_cli(
        gw, "create", "--name", "line-3", "--scope", "register", "--expires-in", "2d"
    )
    plain = re.search(r"^token: (cft_\S+)$", done.stdout, re.M).group(1)
    gw.tokens.append(plain)
    assert done.stdout.count(plain) == 1 and "shown only now" in done.stdout
    made = json.loads(
        (
            await tokens_cli(
                gw, "create", "--name", "ci", "--scope", "read", "--scope", "rotate", "--json"
            )
        ).stdout
    )
    gw.tokens.append(made["token"])
    assert made["scopes"] == ["read", "rotate"] and made["state"] == "active"

    listed = await tokens_cli(gw, "list", "--json")
    entries = json.loads(listed.stdout)
    assert [(e["name"], e["scopes"]) for e in entries] == [
        ("line-3", ["register"]),
        ("ci", ["read", "rotate"]),
    ]
    expires = dt.datetime.fromisoformat(entries[0]["expires_at"])
    assert abs(expires - utcnow() - dt.timedelta(days=2)) < dt.timedelta(minutes=1)
    table = await tokens_cli(gw, "list")
    assert "line-3" in table.stdout and "register" in table.stdout
    async with gw.store.transaction() as session:
        digests = [row.token_sha256 for row in await tokens.list_tokens(session)]
    for output in (listed.stdout, table.stdout):
        assert plain not in output and made["token"] not in output
        assert not any(digest in output for digest in digests)

    device_dir = gw.env.tmp / "device"
    args = ["--factory", "acme", "--dir", str(device_dir), "--trust", str(gw.pki() / "root.crt")]
    await gw.agent(*args, token=plain)
    used = json.loads((await tokens_cli(gw, "list", "--json")).stdout)[0]
    assert used["last_used_at"] is not None

    revoked = await tokens_cli(gw, "revoke", str(entries[0]["id"]))
    assert "revoked; it can no longer be used" in revoked.stdout
    again = await tokens_cli(gw, "revoke", str(entries[0]["id"]))
    assert "was already revoked at" in again.stdout
    refused = await gw.agent(*args, "--force", token=plain, expect=2)
    assert "(401): API token 'line-3' was revoked" in refused.stderr
    assert json.loads((await tokens_cli(gw, "list", "--json")).stdout)[0]["state"] == "revoked"

    async with gw.store.transaction() as session:
        entries = await audit.list_audit(session, actor="cli")
    actions = sorted(e.action for e in entries if e.action.startswith("token."))
    assert actions == ["token.create", "token.create", "token.revoke"]
    await gw.assert_token_stored_nowhere()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--name", "x", "--scope", "admin"],
            "unknown scope 'admin'; allowed scopes: register, read, rotate, pki-admin",
        ),
        (["--name", " ", "--scope", "read"], "token name must be 1 to 128 printable characters"),
        (["--name", "x", "--scope", "read", "--expires-in", "0d"], "'0d' is not a positive"),
        (["--name", "x", "--scope", "read", "--expires-in", "99999999w"], "longer than 36500d"),
        (["--name", "x"], "Missing option '--scope'"),
    ],
)
async def test_tokens_create_refusals(gw, args, message):
    done = await tokens_cli(gw, "create", *args, expect=2)
    assert message in done.stderr
    assert json.loads((await tokens_cli(gw, "list", "--json")).stdout) == []


async def test_revoking_an_unknown_token_is_one_line(gw):
    done = await tokens_cli(gw, "revoke", "999", expect=2)
    assert "no API token with id 999" in done.stderr and done.stderr.count("\n") == 1


async def test_agent_needs_a_token_and_never_echoes_one(gw):
    args = ["--factory", "acme", "--dir", str(gw.env.tmp / "d"), "--insecure-first-contact"]
    done = await gw.agent(*args, token=None, expect=2)
    assert f"set {TOKEN_ENV}" in done.stderr
    gw.tokens.append("cft_typo with space")
    done = await gw.agent(*args, token="cft_typo with space", expect=2)
    assert "copy it whole" in done.stderr
