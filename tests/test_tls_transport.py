"""TLS server stacks on loopback: aiohttp, curl and openssl s_client as clients, both stacks."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import socket
import ssl
import struct
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL

from certfleet.tls import (
    TicketKeys,
    client_connection,
    client_context,
    server_context,
    start_tls_server,
    stats,
)
from certfleet.tls.contexts import trust_more

HOST = "127.0.0.1"
DEVICE_ID = str(uuid.UUID(int=7))
BIG = hashlib.sha256(b"seed").digest() * (1024 * 1024 // 32)  # 1 MiB

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")


# --- certificates ---------------------------------------------------------


@dataclass
class Pki:
    dir: Path
    root: Path
    device_ca: Path
    server: Path
    server_key: Path
    client: Path  # leaf + device CA
    client_leaf: Path
    client_key: Path
    rogue: Path
    rogue_key: Path


def _name(cn: str, ou: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if ou:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    return x509.Name(attrs)


def _issue(subject, key, issuer, issuer_key, *, ca=False, eku=None, san=None):
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _ca(cn, issuer=None, issuer_key=None):
    key = ec.generate_private_key(ec.SECP256R1())
    if issuer is None:
        return _issue(_name(cn), key, _name(cn), key, ca=True), key
    return _issue(_name(cn), key, issuer.subject, issuer_key, ca=True), key


def _write(path: Path, *items) -> Path:
    pem = b""
    for item in items:
        if isinstance(item, x509.Certificate):
            pem += item.public_bytes(serialization.Encoding.PEM)
        else:
            pem += item.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
    path.write_bytes(pem)
    return path


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("tls-pki")
    root, root_key = _ca("certfleet test root")
    device_ca, device_ca_key = _ca("certfleet test device CA", root, root_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue(
        _name("est.test"),
        server_key,
        root.subject,
        root_key,
        eku=ExtendedKeyUsageOID.SERVER_AUTH,
        san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))],
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _issue(
        _name(DEVICE_ID, "factory-1"),
        client_key,
        device_ca.subject,
        device_ca_key,
        eku=ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    rogue_root, rogue_root_key = _ca("someone else's root")
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue = _issue(
        _name(DEVICE_ID, "factory-1"),
        rogue_key,
        rogue_root.subject,
        rogue_root_key,
        eku=ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    return Pki(
        dir=d,
        root=_write(d / "root.pem", root),
        device_ca=_write(d / "device-ca.pem", device_ca),
        server=_write(d / "server.pem", server),
        server_key=_write(d / "server.key", server_key),
        client=_write(d / "client.pem", client, device_ca),
        client_leaf=_write(d / "client-leaf.pem", client),
        client_key=_write(d / "client.key", client_key),
        rogue=_write(d / "rogue.pem", rogue, rogue_root),
        rogue_key=_write(d / "rogue.key", rogue_key),
    )


# --- the app under test ---------------------------------------------------


async def whoami(request: web.Request) -> web.Response:
    t = request.transport
    assert t is not None
    cert = t.get_extra_info("peercert_x509")
    unique = t.get_extra_info("tls_unique")
    chain = t.get_extra_info("peer_chain")
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value if cert else None
    return web.json_response(
        {
            "cn": cn,
            "version": t.get_extra_info("tls_version"),
            "tls_unique": unique.hex() if unique else None,
            "reused": t.get_extra_info("session_reused"),
            "chain": [c.subject.rfc4514_string() for c in chain] if chain else None,
            "port": t.get_extra_info("peername")[1],
            "scheme": request.scheme,
            "pid": os.getpid(),
        }
    )


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({"length": len(body), "sha256": hashlib.sha256(body).hexdigest()})


async def big(request: web.Request) -> web.Response:
    return web.Response(body=BIG, content_type="application/octet-stream")


async def stream(request: web.Request) -> web.StreamResponse:
    """8 MiB written in pieces; each write waits for the client (write flow control)."""
    resp = web.StreamResponse()
    await resp.prepare(request)
    for _ in range(8):
        for i in range(0, len(BIG), 64 * 1024):
            await resp.write(BIG[i : i + 64 * 1024])
    await resp.write_eof()
    return resp


async def slow_echo(request: web.Request) -> web.Response:
    """Reads slowly, so the server must stop reading from the client (read flow control)."""
    digest, length = hashlib.sha256(), 0
    await asyncio.sleep(0.2)
    while chunk := await request.content.read(16 * 1024):
        digest.update(chunk)
        length += len(chunk)
        if length % (1024 * 1024) < 16 * 1024:
            await asyncio.sleep(0.01)
    return web.json_response({"length": length, "sha256": digest.hexdigest()})


def make_app() -> web.Application:
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_get("/whoami", whoami)
    app.router.add_post("/echo", echo)
    app.router.add_get("/big", big)
    app.router.add_get("/stream", stream)
    app.router.add_post("/slow-echo", slow_echo)
    return app


@pytest.fixture(params=["openssl4", "stdlib"])
def stack(request) -> str:
    return request.param


@contextlib.asynccontextmanager
async def tls_server(context, *, sock=None, handshake_timeout=5.0, ticket_keys=None):
    """The test app over TLS on 127.0.0.1 (an ephemeral port, or `sock`); yields the port."""
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    server = await start_tls_server(
        runner.server,
        None if sock else HOST,
        None if sock else 0,
        context,
        sock=sock,
        handshake_timeout=handshake_timeout,
        ticket_keys=ticket_keys,
    )
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await runner.cleanup()
        await server.wait_closed()


@pytest.fixture
async def serve(stack, pki):
    """Start servers on the stack under test; stop them all at the end."""
    async with contextlib.AsyncExitStack() as running:

        async def start(*, require=True, trusted=None, **options) -> int:
            context = server_context(
                pki.server,
                pki.server_key,
                trusted or pki.root,
                require_client_cert=require,
                stack=stack,
            )
            return await running.enter_async_context(tls_server(context, **options))

        yield start


# --- clients --------------------------------------------------------------


def stdlib_client(pki: Pki, version: str, *, cert=True, rogue=False) -> ssl.SSLContext:
    if rogue:
        ctx = client_context(pki.rogue, pki.rogue_key, pki.root)
    elif cert:
        ctx = client_context(pki.client, pki.client_key, pki.root)
    else:
        ctx = client_context(None, None, pki.root)
    assert isinstance(ctx, ssl.SSLContext)
    if version == "TLSv1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def get_json(port: int, ctx: ssl.SSLContext, path: str = "/whoami") -> dict:
    """One request on a new aiohttp connection."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"https://{HOST}:{port}{path}", ssl=ctx) as resp:
            assert resp.status == 200
            return await resp.json()


async def stream_get(port: int, ctx: ssl.SSLContext) -> tuple[dict, bytes | None]:
    """One request over asyncio streams; also returns the client's own tls-unique."""
    reader, writer = await asyncio.open_connection(HOST, port, ssl=ctx)
    unique = writer.get_extra_info("ssl_object").get_channel_binding("tls-unique")
    writer.write(REQUEST)
    response = await reader.read()
    writer.close()
    return json.loads(response.split(b"\r\n\r\n", 1)[1]), unique


async def run(*argv: str, stdin: bytes = b"", timeout: float = 20) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def s_client_argv(pki: Pki, port: int, version: str, *session: str) -> list[str]:
    flag = "-tls1_3" if version == "TLSv1.3" else "-tls1_2"
    return [
        "openssl",
        "s_client",
        "-connect",
        f"{HOST}:{port}",
        flag,
        "-CAfile",
        str(pki.root),
        "-verify_return_error",
        "-verify_ip",
        HOST,
        "-cert",
        str(pki.client_leaf),
        "-cert_chain",
        str(pki.device_ca),
        "-key",
        str(pki.client_key),
        "-ign_eof",
        *session,
    ]


REQUEST = b"GET /whoami HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


def response_json(s_client_output: str) -> dict:
    start = s_client_output.index('{"cn"')
    return json.JSONDecoder().raw_decode(s_client_output, start)[0]


VERSIONS = ["TLSv1.3", "TLSv1.2"]


# --- tests ----------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
async def test_aiohttp_client_sees_its_cert_and_version(serve, pki, version):
    port = await serve()
    body = await get_json(port, stdlib_client(pki, version))
    assert body["cn"] == DEVICE_ID
    assert body["version"] == version
    assert body["scheme"] == "https"
    assert body["reused"] is False


@pytest.mark.parametrize("version", VERSIONS)
async def test_tls_unique_matches_the_client(serve, pki, version):
    port = await serve()
    body, client_unique = await stream_get(port, stdlib_client(pki, version))
    assert body["version"] == version
    if version == "TLSv1.2":
        # Both ends agree on the first Finished message.
        assert len(client_unique) == 12
        assert body["tls_unique"] == client_unique.hex()
    else:
        assert body["tls_unique"] is None


async def test_peer_chain_runs_to_the_trust_anchor(serve, pki, stack):
    port = await serve()
    body = await get_json(port, stdlib_client(pki, "TLSv1.3"))
    if stack == "stdlib" and not hasattr(ssl.SSLObject, "get_verified_chain"):
        assert body["chain"] is None  # Python < 3.13 cannot tell
    else:
        assert body["chain"] == [
            f"OU=factory-1,CN={DEVICE_ID}",
            "CN=certfleet test device CA",
            "CN=certfleet test root",
        ]


async def test_a_device_ca_alone_is_a_trust_anchor(serve, pki):
    port = await serve(trusted=pki.device_ca)
    body = await get_json(port, stdlib_client(pki, "TLSv1.3"))
    assert body["cn"] == DEVICE_ID


@needs_curl
@pytest.mark.parametrize("version", VERSIONS)
async def test_curl(serve, pki, version):
    port = await serve()
    pin = ["--tlsv1.2", "--tls-max", "1.2"] if version == "TLSv1.2" else ["--tlsv1.3"]
    code, out, err = await run(
        "curl",
        "-sS",
        *pin,
        "--cacert",
        str(pki.root),
        "--cert",
        str(pki.client),
        "--key",
        str(pki.client_key),
        f"https://{HOST}:{port}/whoami",
    )
    assert code == 0, err
    body = json.loads(out)
    assert body["cn"] == DEVICE_ID
    assert body["version"] == version


@needs_curl
async def test_curl_without_cert_is_refused(serve, pki):
    port = await serve()
    code, _, _ = await run(
        "curl", "-sS", "--tlsv1.2", "--tls-max", "1.2", "--cacert", str(pki.root),
        f"https://{HOST}:{port}/whoami",
    )  # fmt: skip
    assert code != 0


@needs_openssl
@pytest.mark.parametrize("version", VERSIONS)
async def test_s_client_resumes_a_session(serve, pki, version, tmp_path):
    port = await serve()
    sess = tmp_path / "session.pem"
    code, out, err = await run(
        *s_client_argv(pki, port, version, "-sess_out", str(sess)), stdin=REQUEST
    )
    assert code == 0, err
    assert f"New, {version}" in out
    first = response_json(out)
    assert first["reused"] is False
    assert first["cn"] == DEVICE_ID

    code, out, err = await run(
        *s_client_argv(pki, port, version, "-sess_in", str(sess)), stdin=REQUEST
    )
    assert code == 0, err
    assert f"Reused, {version}" in out
    second = response_json(out)
    assert second["reused"] is True
    assert second["cn"] == DEVICE_ID  # the cert comes back from the ticket
    assert second["version"] == version
    if version == "TLSv1.2":
        assert second["tls_unique"] and second["tls_unique"] != first["tls_unique"]


@pytest.mark.parametrize("version", VERSIONS)
async def test_no_client_cert_is_refused_when_required(serve, pki, stack, version, caplog):
    port = await serve()
    failed = stats.failed
    with caplog.at_level(logging.INFO, logger="certfleet.tls"):
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            await get_json(port, stdlib_client(pki, version, cert=False))
        await asyncio.sleep(0.05)
    if stack == "openssl4":
        # aiohttp may retry once after the server hangs up on a fresh connection.
        records = [r for r in caplog.records if "handshake" in r.getMessage()]
        assert stats.failed - failed == len(records) >= 1
        for record in records:
            assert record.levelno == logging.INFO
            assert HOST in record.getMessage()
            assert "peer did not return a certificate" in record.getMessage()
            assert record.exc_info is None


@pytest.mark.parametrize("version", VERSIONS)
async def test_no_client_cert_is_let_in_when_optional(serve, pki, version):
    port = await serve(require=False)
    body = await get_json(port, stdlib_client(pki, version, cert=False))
    assert body["cn"] is None
    assert body["chain"] is None
    body = await get_json(port, stdlib_client(pki, version))
    assert body["cn"] == DEVICE_ID


@pytest.mark.parametrize("require", [True, False])
@pytest.mark.parametrize("version", VERSIONS)
async def test_cert_from_an_untrusted_ca_is_refused(serve, pki, require, version):
    port = await serve(require=require)
    with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
        await get_json(port, stdlib_client(pki, version, rogue=True))


async def test_a_ca_trusted_while_serving_lets_its_clients_in(stack, pki):
    context = server_context(pki.server, pki.server_key, pki.root, stack=stack)
    async with tls_server(context) as port:
        assert (await get_json(port, stdlib_client(pki, "TLSv1.3")))["cn"] == DEVICE_ID
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            await get_json(port, stdlib_client(pki, "TLSv1.3", rogue=True))
        rogue_root = x509.load_pem_x509_certificates(pki.rogue.read_bytes())[1]
        trust_more(context, [rogue_root])
        assert (await get_json(port, stdlib_client(pki, "TLSv1.3", rogue=True)))["cn"] == DEVICE_ID


@pytest.mark.parametrize("version", VERSIONS)
async def test_large_bodies_both_ways(serve, pki, version):
    port = await serve()
    ctx = stdlib_client(pki, version)

    async def chunks():
        for i in range(0, len(BIG), 50_000):
            yield BIG[i : i + 50_000]

    async with aiohttp.ClientSession() as session:
        async with session.post(f"https://{HOST}:{port}/echo", data=chunks(), ssl=ctx) as resp:
            assert resp.status == 200
            assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
            assert await resp.json() == {
                "length": len(BIG),
                "sha256": hashlib.sha256(BIG).hexdigest(),
            }
        async with session.get(f"https://{HOST}:{port}/big", ssl=ctx) as resp:
            assert await resp.read() == BIG


async def test_flow_control_with_slow_readers_on_both_ends(serve, pki):
    port = await serve()
    ctx = stdlib_client(pki, "TLSv1.3")
    body = BIG * 8
    async with aiohttp.ClientSession() as session:
        async with session.get(f"https://{HOST}:{port}/stream", ssl=ctx) as resp:
            await asyncio.sleep(0.3)  # the server fills its buffers and must wait
            received = hashlib.sha256()
            while chunk := await resp.content.read(256 * 1024):
                received.update(chunk)
            assert received.hexdigest() == hashlib.sha256(body).hexdigest()

        async with session.post(f"https://{HOST}:{port}/slow-echo", data=body, ssl=ctx) as resp:
            assert await resp.json() == {
                "length": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
            }


async def test_keep_alive_serves_many_requests_on_one_connection(serve, pki):
    port = await serve()
    completed = stats.completed
    connector = aiohttp.TCPConnector(limit=1, ssl=stdlib_client(pki, "TLSv1.3"))
    async with aiohttp.ClientSession(connector=connector) as session:
        ports = set()
        for _ in range(200):
            async with session.get(f"https://{HOST}:{port}/whoami") as resp:
                body = await resp.json()
                ports.add(body["port"])
                assert body["cn"] == DEVICE_ID
    assert len(ports) == 1
    assert stats.completed == completed + 1


@pytest.mark.parametrize("sends", [b"", b"\x16\x03\x01"])
async def test_silent_peer_is_dropped_after_the_handshake_timeout(serve, stack, sends, caplog):
    port = await serve(handshake_timeout=0.5)
    timed_out = stats.timed_out
    with caplog.at_level(logging.INFO, logger="certfleet.tls"):
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(sends)
        started = time.monotonic()
        try:
            leftover = await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:
            leftover = b""
        waited = time.monotonic() - started
        writer.close()
    assert leftover == b""
    assert 0.4 <= waited < 4
    if stack == "openssl4":
        assert stats.timed_out == timed_out + 1
        assert any("timed out" in r.getMessage() for r in caplog.records)


async def test_client_closing_early_does_not_upset_the_server(serve, pki):
    port = await serve()
    reader, writer = await asyncio.open_connection(HOST, port, ssl=stdlib_client(pki, "TLSv1.3"))
    writer.write(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    writer.close()  # close_notify while the server may still be answering
    await writer.wait_closed()
    body = await get_json(port, stdlib_client(pki, "TLSv1.3"))
    assert body["cn"] == DEVICE_ID


def _half_close(ctx: SSL.Context, port: int) -> float:
    """Send a request, then TCP FIN without close_notify; time until the server hangs up."""
    with socket.create_connection((HOST, port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 5, 0))
        conn = client_connection(ctx, HOST, sock)
        conn.do_handshake()
        conn.sendall(REQUEST)
        sock.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        while True:
            try:
                if not conn.recv(65536):
                    break
            except (SSL.ZeroReturnError, SSL.SysCallError):
                break
        return time.monotonic() - started


async def test_half_closed_peer_is_hung_up_on_promptly(serve, pki):
    port = await serve()
    ctx = client_context(pki.client, pki.client_key, pki.root, stack="openssl4")
    assert await asyncio.to_thread(_half_close, ctx, port) < 2
    assert (await get_json(port, stdlib_client(pki, "TLSv1.2")))["cn"] == DEVICE_ID


async def test_reuse_port_lets_processes_bind_the_same_port(stack, pki):
    context = server_context(pki.server, pki.server_key, pki.root, stack=stack)
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    first = await start_tls_server(runner.server, HOST, 0, context, reuse_port=True)
    port = first.sockets[0].getsockname()[1]
    second = await start_tls_server(runner.server, HOST, port, context, reuse_port=True)
    try:
        assert (await get_json(port, stdlib_client(pki, "TLSv1.3")))["cn"] == DEVICE_ID
    finally:
        for server in (first, second):
            server.close()
        await runner.cleanup()


@pytest.mark.parametrize("version", VERSIONS)
def test_uvloop_runs_both_stacks(stack, pki, version):
    uvloop = pytest.importorskip("uvloop")

    async def scenario():
        context = server_context(pki.server, pki.server_key, pki.root, stack=stack)
        async with tls_server(context, handshake_timeout=0.5) as port:
            body = await get_json(port, stdlib_client(pki, version))
            assert (body["cn"], body["version"]) == (DEVICE_ID, version)
            async with aiohttp.ClientSession() as session:
                url = f"https://{HOST}:{port}/echo"
                async with session.post(url, data=BIG, ssl=stdlib_client(pki, version)) as resp:
                    assert (await resp.json())["length"] == len(BIG)
            reader, writer = await asyncio.open_connection(HOST, port)
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()

    uvloop.run(scenario())


# --- the openssl4 stack's own pieces ----------------------------------------


def _pyopenssl_get(ctx: SSL.Context, port: int, name: str, session=None):
    """A blocking pyOpenSSL client (Nagle on): one request; returns the body and the session."""
    with socket.create_connection((HOST, port)) as sock:
        # Blocking, as pyOpenSSL wants, but never stuck for more than 5 s.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 5, 0))
        conn = client_connection(ctx, name, sock)
        if session is not None:
            conn.set_session(session)
        conn.do_handshake()
        conn.sendall(REQUEST)
        data = b""
        while True:
            try:
                chunk = conn.recv(65536)
            except (SSL.ZeroReturnError, SSL.SysCallError):
                break
            if not chunk:
                break
            data += chunk
        # Without our close_notify OpenSSL marks the session not resumable.
        conn.shutdown()
        body = json.loads(data.split(b"\r\n\r\n", 1)[1])
        return body, conn.get_session()


@pytest.mark.parametrize("stack", ["openssl4"])
async def test_pyopenssl_client_checks_the_server_name(serve, pki, stack):
    port = await serve()
    ctx = client_context(pki.client, pki.client_key, pki.root, stack="openssl4")
    body, _ = await asyncio.to_thread(_pyopenssl_get, ctx, port, HOST)
    assert body["cn"] == DEVICE_ID
    body, _ = await asyncio.to_thread(_pyopenssl_get, ctx, port, "localhost")
    assert body["cn"] == DEVICE_ID
    with pytest.raises(SSL.Error):
        await asyncio.to_thread(_pyopenssl_get, ctx, port, "elsewhere.example")


@pytest.mark.parametrize("stack", ["openssl4"])
async def test_client_with_nagle_on_is_not_kept_waiting(serve, pki, stack):
    # The server's last TLS 1.3 flight ACKs the client's Finished at once;
    # without it the request would sit in the client for a delayed ACK (40 ms).
    port = await serve()
    ctx = client_context(pki.client, pki.client_key, pki.root, stack="openssl4")
    times = []
    for _ in range(5):
        started = time.monotonic()
        await asyncio.to_thread(_pyopenssl_get, ctx, port, HOST)
        times.append(time.monotonic() - started)
    assert sorted(times)[2] < 0.030


@pytest.mark.parametrize("stack", ["openssl4"])
async def test_workers_with_the_same_secret_resume_each_others_sessions(serve, pki, stack):
    secret = os.urandom(32)
    now = [1_000_000.0]
    clock = lambda: now[0]  # noqa: E731
    # Separate contexts stand for separate processes: each has its own
    # OpenSSL-generated key until TicketKeys replaces it.
    port_a = await serve(ticket_keys=TicketKeys(secret, period=3600, clock=clock))
    port_b = await serve(ticket_keys=TicketKeys(secret, period=3600, clock=clock))
    port_c = await serve(ticket_keys=TicketKeys(os.urandom(32), period=3600, clock=clock))
    port_d = await serve()
    ctx = client_context(pki.client, pki.client_key, pki.root, stack="openssl4")

    _, session = await asyncio.to_thread(_pyopenssl_get, ctx, port_a, HOST)
    body, session = await asyncio.to_thread(_pyopenssl_get, ctx, port_b, HOST, session)
    assert body["reused"] is True
    assert body["cn"] == DEVICE_ID
    body, _ = await asyncio.to_thread(_pyopenssl_get, ctx, port_c, HOST, session)
    assert body["reused"] is False
    body, _ = await asyncio.to_thread(_pyopenssl_get, ctx, port_d, HOST, session)
    assert body["reused"] is False

    # Next period: a new key on both; the old ticket gives a full handshake.
    now[0] += 3600
    body, fresh = await asyncio.to_thread(_pyopenssl_get, ctx, port_a, HOST, session)
    assert body["reused"] is False
    body, _ = await asyncio.to_thread(_pyopenssl_get, ctx, port_b, HOST, fresh)
    assert body["reused"] is True


# A server process on its own OpenSSL state; -1 as fd: listen on a port of its own.
WORKER = """
import asyncio, socket, sys
from certfleet.tls import TicketKeys, server_context, start_tls_server
from tests.test_tls_transport import tls_server

async def main(certs, secret, fd):
    context = server_context(f"{certs}/server.pem", f"{certs}/server.key", f"{certs}/root.pem")
    sock = socket.socket(fileno=fd) if fd >= 0 else None
    async with tls_server(context, sock=sock, ticket_keys=TicketKeys(secret)) as port:
        print(port, flush=True)
        await asyncio.Event().wait()

asyncio.run(main(sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3])))
"""


@pytest.fixture
async def workers(pki):
    """Start server processes: workers(secret, fd=-1) -> port."""
    procs = []

    async def start(secret: bytes, sock: socket.socket | None = None) -> int:
        fd = sock.fileno() if sock is not None else -1
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WORKER, str(pki.dir), secret.hex(), str(fd),
            stdout=asyncio.subprocess.PIPE,
            pass_fds=[fd] if sock is not None else [],
            cwd=Path(__file__).parent.parent,
        )  # fmt: skip
        procs.append(proc)
        return int(await asyncio.wait_for(proc.stdout.readline(), 30))

    yield start
    for proc in procs:
        proc.kill()
        await proc.wait()


async def test_processes_with_the_same_secret_resume_each_others_sessions(workers, pki):
    secret = os.urandom(32)
    port_a, port_b, port_c = await asyncio.gather(
        workers(secret), workers(secret), workers(os.urandom(32))
    )
    ctx = client_context(pki.client, pki.client_key, pki.root, stack="openssl4")
    first, session = await asyncio.to_thread(_pyopenssl_get, ctx, port_a, HOST)
    body, _ = await asyncio.to_thread(_pyopenssl_get, ctx, port_b, HOST, session)
    assert body["reused"] is True
    assert body["pid"] != first["pid"]
    body, _ = await asyncio.to_thread(_pyopenssl_get, ctx, port_c, HOST, session)
    assert body["reused"] is False


async def test_pre_forked_workers_share_one_socket_and_the_tickets(workers, pki):
    secret = os.urandom(32)
    with socket.create_server((HOST, 0)) as listener:
        port = listener.getsockname()[1]
        await asyncio.gather(workers(secret, listener), workers(secret, listener))
    ctx = client_context(pki.client, pki.client_key, pki.root, stack="openssl4")
    _, session = await asyncio.to_thread(_pyopenssl_get, ctx, port, HOST)
    served_by = set()
    for _ in range(20):
        body, session = await asyncio.to_thread(_pyopenssl_get, ctx, port, HOST, session)
        assert body["reused"] is True  # whichever worker accepted
        served_by.add(body["pid"])
    assert served_by  # the kernel picks the worker; usually both serve


def test_ticket_keys_depend_on_secret_and_period():
    keys = TicketKeys(b"s" * 32)
    assert len(keys.key(1)) == 80
    assert keys.key(1) == TicketKeys(b"s" * 32).key(1)
    assert keys.key(1) != keys.key(2)
    assert keys.key(1) != TicketKeys(b"t" * 32).key(1)
    with pytest.raises(ValueError):
        TicketKeys(b"short")
