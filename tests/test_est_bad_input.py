"""Malformed and hostile EST requests: each gets its status and one-line reason, stores nothing.

Every case prepares what it needs (devices, credentials, a CA change, a server
with another policy), then the store's rows are counted, the request is sent,
and the counts must be unchanged.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from certfleet.fleet import pki_admin
from certfleet.pki.keys import cert_sha256, generate_private_key
from certfleet.store import denylist, devices, est
from certfleet.store.schema import utcnow

from .est_fixtures import EstEnv, Reply, make_csr, running_env

Send = Callable[[], Awaitable[Reply]]


@dataclass(frozen=True)
class Case:
    name: str
    prepare: Callable[[EstEnv], Awaitable[Send]]
    status: int
    fragment: str


CASES: list[Case] = []


def case(status: int, fragment: str) -> Callable:
    def register(prepare: Callable[[EstEnv], Awaitable[Send]]) -> Callable:
        CASES.append(Case(prepare.__name__, prepare, status, fragment))
        return prepare

    return register


def _reenroll(env: EstEnv, device, body: bytes, **kwargs) -> Send:
    return lambda: env.request("POST", "simplereenroll", body, device=device, **kwargs)


def _b64(der: bytes) -> bytes:
    return base64.b64encode(der)


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


# -- framing --------------------------------------------------------------------------------


@case(400, "CSR is not valid DER PKCS#10")
async def truncated_der(env):
    device = await env.device()
    return _reenroll(env, device, _b64(device.csr()[:-12]))


@case(400, "body is PEM; EST wants base64 DER")
async def pem_instead_of_base64(env):
    device = await env.device()
    csr = x509.load_der_x509_csr(device.csr())
    return _reenroll(env, device, csr.public_bytes(serialization.Encoding.PEM))


@case(400, "which is not base64")
async def not_base64(env):
    device = await env.device()
    return _reenroll(env, device, b"this is not base64!")


@case(400, "body looks like binary DER")
async def raw_der_not_base64(env):
    device = await env.device()
    return _reenroll(env, device, device.csr())


@case(400, "body is empty")
async def empty_body(env):
    device = await env.device()
    return _reenroll(env, device, b"")


@case(400, "only '=' padding")
async def only_padding(env):
    device = await env.device()
    return _reenroll(env, device, b"====")


@case(400, "not a multiple of 4")
async def truncated_base64(env):
    device = await env.device()
    return _reenroll(env, device, _b64(device.csr())[:-1])


@case(400, "CSR is not valid DER PKCS#10")
async def certificate_instead_of_csr(env):
    device = await env.device()
    return _reenroll(env, device, _b64(device.cert.public_bytes(serialization.Encoding.DER)))


@case(415, "Content-Type must be application/pkcs10, got text/plain")
async def wrong_content_type(env):
    device = await env.device()
    return _reenroll(env, device, _b64(device.csr()), content_type="text/plain")


@case(415, "Content-Type must be application/pkcs10, got application/octet-stream")
async def octet_stream_content_type(env):
    device = await env.device()
    return _reenroll(env, device, _b64(device.csr()), content_type="application/octet-stream")


@case(413, "request body of 65540 bytes is over this server's limit of 65536 bytes")
async def huge_body(env):
    device = await env.device()
    return _reenroll(env, device, b"A" * (64 * 1024 + 4))


@case(413, "chunked request body is over this server's limit of 65536 bytes")
async def huge_chunked_body(env):
    device = await env.device()

    async def chunks():
        for _ in range(80):
            yield b"A" * 1024

    return lambda: env.request("POST", "simplereenroll", chunks(), device=device)


# -- routing --------------------------------------------------------------------------------


@case(404, "unknown CA label 'nope' (known: acme, globex)")
async def unknown_label(env):
    device = await env.device()
    return _reenroll(env, device, _b64(device.csr()), label="nope")


@case(404, "unknown EST operation 'renew'")
async def unknown_operation(env):
    device = await env.device()
    return lambda: env.request("POST", "renew", _b64(device.csr()), device=device)


@case(405, "simpleenroll takes POST, not GET")
async def get_on_simpleenroll(env):
    return lambda: env.request("GET", "simpleenroll", content_type=None)


@case(405, "cacerts takes GET, HEAD, not PUT")
async def put_on_cacerts(env):
    return lambda: env.request("PUT", "cacerts", b"x")


@case(501, "fullcmc is not supported; use simpleenroll/simplereenroll")
async def fullcmc(env):
    return lambda: env.request("POST", "fullcmc", b"MAA=", content_type="application/pkcs7-mime")


# -- the CSR --------------------------------------------------------------------------------


@case(400, "CSR signature does not verify")
async def csr_with_bad_signature(env):
    device = await env.device()
    der = bytearray(device.csr())
    der[-1] ^= 0x01
    return _reenroll(env, device, _b64(bytes(der)))


@case(400, "unsupported key type RSA")
async def rsa_key(env):
    device = await env.device()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    builder = x509.CertificateSigningRequestBuilder().subject_name(device.cert.subject)
    der = builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    return _reenroll(env, device, _b64(der))


@case(400, "unsupported curve secp521r1")
async def p521_key(env):
    device = await env.device()
    return _reenroll(env, device, _b64(device.csr(key=ec.generate_private_key(ec.SECP521R1()))))


@case(400, "differs from the current certificate's CN=")
async def wrong_subject_on_reenroll(env):
    device = await env.device()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, str(uuid.uuid4())),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "acme"),
        ]
    )
    return _reenroll(env, device, _b64(device.csr(subject=subject)))


@case(400, "CSR SubjectAltName (DNS:evil.example) differs from the current certificate's (none)")
async def changed_san(env):
    device = await env.device()
    return _reenroll(env, device, _b64(device.csr(sans=[x509.DNSName("evil.example")])))


@case(400, "CSR reuses the current certificate's key")
async def same_key(env):
    device = await env.device()
    return _reenroll(env, device, _b64(device.csr(key=device.key)))


@case(400, "connect with TLS 1.2 or ask the operator to turn require_tls_unique off")
async def tls_unique_required_on_tls13(env):
    await env.serve(require_tls_unique=True)
    device = await env.device()
    return _reenroll(env, device, _b64(device.csr()), tls="1.3")


@case(400, "CSR has no challengePassword")
async def tls_unique_missing_on_tls12(env):
    await env.serve(require_tls_unique=True)
    device = await env.device()
    return _reenroll(env, device, _b64(device.csr()), tls="1.2")


@case(400, "CSR signature does not verify")
async def bad_csr_under_manual_approval(env):
    await env.serve(manual_approval=True)
    device = await env.device()
    der = bytearray(device.csr())
    der[-1] ^= 0x01
    return _reenroll(env, device, _b64(bytes(der)))


# -- enrollment credentials -----------------------------------------------------------------


async def _enroll_with(env, username, password, cn) -> Send:
    csr = make_csr(generate_private_key(), cn=cn)
    return lambda: env.post_csr("simpleenroll", csr, auth=(username, password))


@case(401, "EST username or password is wrong")
async def wrong_basic_password(env):
    device_uuid, username, password = await env.credential()
    return await _enroll_with(env, username, password[::-1], device_uuid)


@case(401, "EST username or password is wrong")
async def unknown_user(env):
    device_uuid, _, password = await env.credential()
    return await _enroll_with(env, "est-nobody", password, device_uuid)


@case(401, "expired at")
async def expired_credential(env):
    device_uuid = str(uuid.uuid4())
    async with env.store.transaction() as session:
        await est.add_est_credential(
            session,
            factory_id=await env.factory_id("acme"),
            username="est-expired",
            secret="old-secret",
            bound_subject=device_uuid,
            expires_at=utcnow() - dt.timedelta(hours=1),
        )
    return await _enroll_with(env, "est-expired", "old-secret", device_uuid)


@case(403, "does not match this credential, which may only enroll CN=")
async def credential_for_another_subject(env):
    _, username, password = await env.credential()
    return await _enroll_with(env, username, password, str(uuid.uuid4()))


@case(403, "belongs to another factory than 'acme'")
async def credential_of_another_factory(env):
    device_uuid, username, password = await env.credential(factory="globex")
    return await _enroll_with(env, username, password, device_uuid)


@case(409, "credential already used to enroll")
async def used_credential_with_a_new_key(env):
    device_uuid, username, password = await env.credential()
    first = await (await _enroll_with(env, username, password, device_uuid))()
    assert first.status == 200
    return await _enroll_with(env, username, password, device_uuid)


@case(401, "needs HTTP Basic enrollment credentials")
async def no_auth_at_all(env):
    csr = make_csr(generate_private_key())
    return lambda: env.post_csr("simpleenroll", csr)


@case(401, "the EST username has a NUL character")
async def username_with_a_nul(env):
    csr = make_csr(generate_private_key())
    return lambda: env.post_csr("simpleenroll", csr, auth=("dev\x00ice", "pw"))


@case(401, "Authorization header is not HTTP Basic")
async def bearer_instead_of_basic(env):
    csr = make_csr(generate_private_key())
    headers = {"Authorization": "Bearer abc.def"}
    return lambda: env.post_csr("simpleenroll", csr, headers=headers)


@case(403, "serverkeygen is disabled on this server")
async def serverkeygen_disabled(env):
    device_uuid, username, password = await env.credential()
    csr = make_csr(generate_private_key(), cn=device_uuid)
    return lambda: env.post_csr("serverkeygen", csr, auth=(username, password))


# -- client certificates --------------------------------------------------------------------


@case(401, "simplereenroll needs the device's current certificate")
async def no_client_cert(env):
    device = await env.device()
    return _reenroll(env, None, _b64(device.csr()))


@case(403, "device cert is not known to this server; register the device first")
async def unknown_device_cert(env):
    device = await env.device(record=False)
    return _reenroll(env, device, _b64(device.csr()))


@case(403, "device cert is on the deny-list (serial ")
async def deny_listed_cert(env):
    device = await env.device()
    async with env.store.transaction() as session:
        await denylist.add_denied(session, cert_sha256(device.cert), reason="test")
    return _reenroll(env, device, _b64(device.csr()))


@case(403, "issued by device CA 'local-ca-1', which was revoked")
async def cert_from_revoked_ca(env):
    device = await env.device(ca="local-ca-1")
    await pki_admin.revoke_device_ca(env.db_url, env.pki["acme"], "local-ca-1", "acme")
    return _reenroll(env, device, _b64(device.csr()))


@case(403, "issued by device CA 'local-ca-1', which was disabled")
async def cert_from_disabled_ca(env):
    device = await env.device(ca="local-ca-1")
    await pki_admin.disable_device_ca(env.db_url, "local-ca-1", "acme")
    return _reenroll(env, device, _b64(device.csr()))


@case(403, "was deleted at")
async def deleted_device(env):
    device = await env.device()
    async with env.store.transaction() as session:
        await devices.soft_delete_device(session, device.uuid)
    return _reenroll(env, device, _b64(device.csr()))


@case(403, "device cert belongs to factory 'globex', not 'acme'")
async def other_factorys_cert(env):
    device = await env.device("globex")
    return _reenroll(env, device, _b64(device.csr()), label="acme")


@case(403, "may only enroll its own subject CN=")
async def mtls_enroll_of_another_subject(env):
    device = await env.device()
    csr = make_csr(generate_private_key(), cn=str(uuid.uuid4()))
    return lambda: env.post_csr("simpleenroll", csr, device=device)


@case(400, "is not a device uuid")
async def mtls_enroll_of_a_non_uuid_subject(env):
    device = await env.device()
    csr = make_csr(generate_private_key(), cn="not-a-uuid")
    return lambda: env.post_csr("simpleenroll", csr, device=device)


# -- trusted-proxy mode ---------------------------------------------------------------------


def _proxied(env, device, cert_pem: str) -> Send:
    headers = {"X-SSL-Client-Cert": urllib.parse.quote(cert_pem)}
    return lambda: env.post_csr("simplereenroll", device.csr(), headers=headers)


@case(401, "simplereenroll needs the device's current certificate")
async def proxy_header_from_untrusted_address(env):
    device = await env.device()
    return _proxied(env, device, _pem(device.cert))


@case(403, "device cert expired at")
async def expired_cert_via_proxy(env):
    await env.serve(tls=False, trusted_proxies=["127.0.0.1"])
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)
    device = await env.device(now=long_ago, validity=dt.timedelta(days=30))
    return _proxied(env, device, _pem(device.cert))


@case(403, "device cert is not valid yet")
async def future_cert_via_proxy(env):
    await env.serve(tls=False, trusted_proxies=["127.0.0.1"])
    device = await env.device(now=dt.datetime.now(dt.UTC) + dt.timedelta(days=3))
    return _proxied(env, device, _pem(device.cert))


@case(400, "X-SSL-Client-Cert header is not a URL-escaped PEM certificate")
async def garbage_proxy_header(env):
    await env.serve(tls=False, trusted_proxies=["127.0.0.1"])
    device = await env.device()
    return _proxied(env, device, "-----BEGIN CERTIFICATE-----\nnope\n")


@case(403, "was not issued by a trusted device CA")
async def self_signed_cert_via_proxy(env):
    await env.serve(tls=False, trusted_proxies=["127.0.0.1"])
    device = await env.device()
    key = generate_private_key()
    now = dt.datetime.now(dt.UTC)
    forged = (
        x509.CertificateBuilder()
        .subject_name(device.cert.subject)
        .issuer_name(device.cert.issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return _proxied(env, device, _pem(forged))


# -- the test -------------------------------------------------------------------------------


@pytest.fixture
async def env(db_url, tmp_path):
    async with running_env(db_url, tmp_path) as running:
        yield running


def test_the_table_is_big_enough():
    assert len(CASES) >= 25
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("bad", CASES, ids=lambda c: c.name)
async def test_refused_with_reason_and_nothing_stored(env, bad, caplog):
    send = await bad.prepare(env)
    before = await env.counts()
    caplog.set_level(logging.INFO, logger="certfleet.est")
    reply = await send()
    assert reply.status == bad.status, reply.text
    assert bad.fragment in reply.text
    assert reply.text.endswith("\n") and reply.text.count("\n") == 1, "one line"
    assert reply.headers["Content-Type"].startswith("text/plain")
    if reply.status == 401:
        assert reply.headers["WWW-Authenticate"] == 'Basic realm="certfleet-est"'
    assert await env.counts() == before
    logged = [r for r in caplog.records if f"refused {bad.status}" in r.getMessage()]
    assert logged and logged[0].levelno == logging.INFO
