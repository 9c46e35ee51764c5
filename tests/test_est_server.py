"""The EST server over real TLS on loopback, SQLite and PostgreSQL: each operation's happy path."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
import re
import urllib.parse

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import load_der_private_key

from certfleet.est import csrattrs, wire
from certfleet.est.policy import EstPolicy
from certfleet.fleet import pki_admin
from certfleet.pki.csr import name_text, tls_unique_password
from certfleet.pki.keys import cert_sha256, generate_private_key
from certfleet.store import audit, certificates, devices, est
from certfleet.store.schema import PendingStatus

from .cli_run import certfleet
from .est_fixtures import Reply, make_csr, running_env


@pytest.fixture
async def env(db_url, tmp_path):
    async with running_env(db_url, tmp_path) as running:
        yield running


ONE_CERT = 1


def _issued(reply: Reply) -> x509.Certificate:
    certs = reply.certs()
    assert len(certs) == ONE_CERT
    return certs[0]


async def _check_recorded(env, cert, operation: str, reply: Reply, device_uuid: str):
    """The cert is in the store with the request that caused it, and audited."""
    row = await env.recorded(cert)
    assert row.issued_by_request == f"est:{operation}:{reply.headers['X-Request-ID']}"
    assert row.device_uuid == device_uuid
    async with env.store.transaction() as session:
        entries = await audit.list_audit(session, target=device_uuid)
    assert any(
        e.action == f"est.{operation}" and e.details["serial"] == row.serial for e in entries
    )
    return row


async def test_cacerts_gives_issuing_ca_and_root_per_label(env):
    for label, factory in ((None, "acme"), ("acme", "acme"), ("globex", "globex")):
        reply = await env.request("GET", "cacerts", label=label)
        assert reply.headers["Content-Type"] == wire.PKCS7_CERTS
        assert reply.headers["Content-Transfer-Encoding"] == "base64"
        chain = env.authorities[factory].chain()
        assert {cert_sha256(c) for c in reply.certs()} == {cert_sha256(c) for c in chain}


async def test_csrattrs_asks_for_p256_and_tls_unique_only_when_required(env):
    reply = await env.request("GET", "csrattrs")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == wire.CSRATTRS
    attrs = csrattrs.parse_csrattrs(base64.b64decode(reply.body))
    assert "1.2.840.10045.2.1=1.2.840.10045.3.1.7" in attrs
    assert "1.2.840.113549.1.9.7" not in attrs
    await env.serve(require_tls_unique=True)
    reply = await env.request("GET", "csrattrs", label="globex")
    assert "1.2.840.113549.1.9.7" in csrattrs.parse_csrattrs(base64.b64decode(reply.body))


async def test_enroll_with_credential_creates_the_device(env):
    device_uuid, username, password = await env.credential()
    reply = await env.post_csr(
        "simpleenroll", make_csr(generate_private_key(), cn=device_uuid), auth=(username, password)
    )
    assert reply.status == 200, reply.text
    cert = _issued(reply)
    assert name_text(cert.subject) == f"CN={device_uuid},OU=acme"
    env.verify(cert)
    row = await _check_recorded(env, cert, "simpleenroll", reply, device_uuid)
    async with env.store.transaction() as session:
        device = await devices.get_device(session, device_uuid)
        credential = await est.get_credential(session, username)
    assert device.registered_via == "est"
    assert device.current_cert_id == row.id
    assert credential.used_at is not None


async def test_enroll_retry_returns_the_same_cert_for_the_same_key_only(env):
    device_uuid, username, password = await env.credential()
    key = generate_private_key()
    first = await env.post_csr(
        "simpleenroll", make_csr(key, cn=device_uuid), auth=(username, password)
    )
    # A lost response: the device retries, even with a newly signed CSR for the same key.
    for _ in range(2):
        again = await env.post_csr(
            "simpleenroll", make_csr(key, cn=device_uuid), auth=(username, password)
        )
        assert again.status == 200, again.text
        assert _issued(again) == _issued(first)
    other = await env.post_csr(
        "simpleenroll", make_csr(generate_private_key(), cn=device_uuid), auth=(username, password)
    )
    assert other.status == 409
    assert f"credential already used to enroll {device_uuid}" in other.text
    async with env.store.transaction() as session:
        assert len(await certificates.list_device_certificates(session, device_uuid)) == 1


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
async def test_reenroll_renews_and_the_new_cert_renews_again(env, tls):
    device = await env.device()
    for _ in range(2):
        key = generate_private_key()
        reply = await env.post_csr("simplereenroll", device.csr(key=key), device=device, tls=tls)
        assert reply.status == 200, reply.text
        cert = _issued(reply)
        assert cert.subject == device.cert.subject
        assert cert.public_key() == key.public_key()
        env.verify(cert)
        await _check_recorded(env, cert, "simplereenroll", reply, device.uuid)
        device = env.save_device(device.uuid, "acme", key, cert)


async def test_reenroll_keeps_the_subject_alt_name(env):
    sans = [x509.DNSName("device-7.factory.test"), x509.UniformResourceIdentifier("urn:dev:7")]
    device = await env.device(sans=sans)
    reply = await env.post_csr("simplereenroll", device.csr(sans=sans), device=device)
    cert = _issued(reply)
    assert list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == sans
    env.verify(cert)


async def test_reenroll_of_a_local_ca_device_is_issued_by_the_online_ca(env):
    device = await env.device(ca="local-ca-1")
    reply = await env.post_csr("simplereenroll", device.csr(), device=device)
    cert = _issued(reply)
    assert cert.issuer == env.authorities["acme"].issuing_ca.subject
    env.verify(cert)


async def test_reenroll_with_the_same_key_when_policy_allows(env):
    await env.serve(allow_same_key=True)
    device = await env.device()
    reply = await env.post_csr("simplereenroll", device.csr(key=device.key), device=device)
    assert reply.status == 200, reply.text
    assert _issued(reply).public_key() == device.key.public_key()


async def test_validity_comes_from_policy(env):
    await env.serve(validity=dt.timedelta(days=30))
    device = await env.device()
    cert = _issued(await env.post_csr("simplereenroll", device.csr(), device=device))
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=29) < lifetime <= dt.timedelta(days=30)


async def test_enroll_with_device_cert_for_its_own_subject(env):
    device = await env.device()
    reply = await env.post_csr(
        "simpleenroll", make_csr(generate_private_key(), cn=device.uuid), device=device
    )
    assert reply.status == 200, reply.text
    cert = _issued(reply)
    env.verify(cert)
    await _check_recorded(env, cert, "simpleenroll", reply, device.uuid)


@pytest.mark.parametrize("auth", ["credential", "device cert"])
async def test_serverkeygen_when_enabled(env, auth):
    await env.serve(serverkeygen_enabled=True)
    if auth == "credential":
        device_uuid, username, password = await env.credential()
        kwargs = {"auth": (username, password)}
    else:
        device = await env.device()
        device_uuid, kwargs = device.uuid, {"device": device}
    client_key = generate_private_key()
    reply = await env.post_csr("serverkeygen", make_csr(client_key, cn=device_uuid), **kwargs)
    assert reply.status == 200, reply.text
    assert reply.headers["Cache-Control"] == "no-store"
    key_der, certs = wire.parse_serverkeygen_multipart(reply.body, reply.headers["Content-Type"])
    key = load_der_private_key(key_der, None)
    cert = certs[0]
    assert cert.public_key() == key.public_key() != client_key.public_key()
    env.verify(cert)
    await _check_recorded(env, cert, "serverkeygen", reply, device_uuid)


async def test_serverkeygen_is_off_by_default(env):
    device_uuid, username, password = await env.credential()
    before = await env.counts()
    reply = await env.post_csr(
        "serverkeygen", make_csr(generate_private_key(), cn=device_uuid), auth=(username, password)
    )
    assert reply.status == 403
    assert reply.text == "serverkeygen is disabled on this server\n"
    assert await env.counts() == before


async def test_labels_pick_the_factory(env):
    device = await env.device("globex")
    reply = await env.post_csr("simplereenroll", device.csr(), device=device, label="globex")
    cert = _issued(reply)
    assert name_text(cert.subject) == f"CN={device.uuid},OU=globex"
    env.verify(cert, "globex")
    await env.serve(default_label=None)
    reply = await env.request("GET", "cacerts")
    assert reply.status == 404
    assert "several CA labels (acme, globex)" in reply.text
    await env.serve(default_label=None, authorities={"globex": env.authorities["globex"]})
    reply = await env.post_csr("simplereenroll", device.csr(), device=device)
    env.verify(_issued(reply), "globex")


async def _approve(env, pending_id: int, verb: str = "approve") -> str:
    done = await asyncio.to_thread(
        certfleet,
        "est",
        "pending",
        verb,
        str(pending_id),
        "--pki",
        str(env.pki["acme"]),
        "--database",
        env.db_url,
    )
    return done.stdout


async def _pending_list(env) -> list[dict]:
    done = await asyncio.to_thread(
        certfleet,
        "est",
        "pending",
        "list",
        "--json",
        "--pki",
        str(env.pki["acme"]),
        "--database",
        env.db_url,
    )
    return json.loads(done.stdout)


async def test_manual_approval_through_the_cli(env):
    await env.serve(manual_approval=True, retry_after=7)
    device_uuid, username, password = await env.credential()
    csr = make_csr(generate_private_key(), cn=device_uuid)
    for _ in range(2):
        held = await env.post_csr("simpleenroll", csr, auth=(username, password))
        assert held.status == 202, held.text
        assert held.headers["Retry-After"] == "7"
    [listed] = await _pending_list(env)
    assert listed["status"] == "pending" and listed["device"] == device_uuid
    assert f"request {listed['id']} is waiting for operator approval" in held.text
    before = await env.counts()
    assert before["est_pending"] == 1 and before["devices"] == 0

    assert "approved" in await _approve(env, listed["id"])
    reply = await env.post_csr("simpleenroll", csr, auth=(username, password))
    cert = _issued(reply)
    env.verify(cert)
    await _check_recorded(env, cert, "simpleenroll", reply, device_uuid)
    again = await env.post_csr("simpleenroll", csr, auth=(username, password))
    assert _issued(again) == cert
    async with env.store.transaction() as session:
        row = await est.get_pending_by_id(session, listed["id"])
        assert row.status == PendingStatus.APPROVED and row.cert_id is not None
        assert len(await certificates.list_device_certificates(session, device_uuid)) == 1


async def test_rejected_request_gets_403_on_retry(env):
    await env.serve(manual_approval=True)
    device = await env.device()
    csr = device.csr()
    held = await env.post_csr("simplereenroll", csr, device=device)
    assert held.status == 202
    [listed] = await _pending_list(env)
    await _approve(env, listed["id"], "reject")
    before = await env.counts()
    reply = await env.post_csr("simplereenroll", csr, device=device)
    assert reply.status == 403
    assert f"request {listed['id']} was rejected by the operator" in reply.text
    assert await env.counts() == before


async def test_approved_serverkeygen_delivers_its_key_once(env):
    await env.serve(manual_approval=True, serverkeygen_enabled=True)
    device = await env.device()
    csr = make_csr(generate_private_key(), cn=device.uuid)
    assert (await env.post_csr("serverkeygen", csr, device=device)).status == 202
    [listed] = await _pending_list(env)
    await _approve(env, listed["id"])
    reply = await env.post_csr("serverkeygen", csr, device=device)
    assert reply.status == 200, reply.text
    again = await env.post_csr("serverkeygen", csr, device=device)
    assert again.status == 409
    assert "already received its server-generated key" in again.text


async def _tls_unique_post(env, device, tls: str, tamper: bool = False) -> Reply:
    """POST a reenroll CSR that carries the tls-unique of the very connection it is sent on."""
    context = env.client_tls(device, tls)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", env.port, ssl=context, server_hostname="127.0.0.1"
    )
    sslobj = writer.get_extra_info("ssl_object")
    unique = sslobj.get_channel_binding("tls-unique") if sslobj.version() == "TLSv1.2" else None
    if unique and tamper:
        unique = bytes(b ^ 1 for b in unique)
    challenge = tls_unique_password(unique) if unique else None
    body = base64.b64encode(device.csr(challenge=challenge))
    head = (
        "POST /.well-known/est/simplereenroll HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/pkcs10\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    writer.write(head.encode() + body)
    data = await reader.read()
    writer.close()
    status_head, _, payload = data.partition(b"\r\n\r\n")
    lines = status_head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return Reply(int(lines[0].split()[1]), headers, payload)


async def test_tls_unique_link_on_tls12(env):
    await env.serve(require_tls_unique=True)
    device = await env.device()
    reply = await _tls_unique_post(env, device, "1.2")
    assert reply.status == 200, reply.text
    env.verify(_issued(reply))
    tampered = await _tls_unique_post(env, device, "1.2", tamper=True)
    assert tampered.status == 400
    assert "does not match this connection's tls-unique" in tampered.text
    on_13 = await _tls_unique_post(env, device, "1.3")
    assert on_13.status == 400
    assert "connect with TLS 1.2 or ask the operator to turn require_tls_unique off" in on_13.text


async def test_client_cert_from_a_trusted_proxy(env):
    await env.serve(tls=False, trusted_proxies=["127.0.0.1"])
    device = await env.device()
    pem = device.cert.public_bytes(serialization.Encoding.PEM).decode()
    header = {"X-SSL-Client-Cert": urllib.parse.quote(pem)}
    reply = await env.post_csr("simplereenroll", device.csr(), headers=header)
    assert reply.status == 200, reply.text
    env.verify(_issued(reply))
    # nginx sends an empty header when the client showed no certificate.
    reply = await env.post_csr("simplereenroll", device.csr(), headers={"X-SSL-Client-Cert": ""})
    assert reply.status == 401


async def test_refusals_are_logged_without_the_password(env, caplog):
    device_uuid, username, password = await env.credential()
    caplog.set_level(logging.INFO, logger="certfleet.est")
    reply = await env.post_csr(
        "simpleenroll",
        make_csr(generate_private_key(), cn=device_uuid),
        auth=(username, "x" + password),
    )
    assert reply.status == 401
    assert reply.headers["WWW-Authenticate"] == 'Basic realm="certfleet-est"'
    [record] = [r for r in caplog.records if "refused" in r.getMessage()]
    line = record.getMessage()
    assert record.levelno == logging.INFO
    assert "401 bad-credentials" in line and "127.0.0.1" in line and username in line
    assert password not in caplog.text
    assert reply.headers["X-Request-ID"] in line


async def test_issued_certificate_fingerprints_match_the_store(env):
    device = await env.device()
    cert = _issued(await env.post_csr("simplereenroll", device.csr(), device=device))
    async with env.store.transaction() as session:
        row = await certificates.get_certificate(session, cert_sha256(cert))
    assert x509.load_pem_x509_certificate(row.cert_pem.encode()) == cert
    assert row.issuer_ca_id == env.authorities["acme"].issuing_ca_id


async def test_peer_is_read_on_the_pyopenssl_stack_too(env):
    pytest.importorskip("certfleet.tls")  # the openssl4 stack, written alongside this
    await env.serve(stack="openssl4", require_tls_unique=True)
    device = await env.device()
    reply = await _tls_unique_post(env, device, "1.2")
    assert reply.status == 200, reply.text
    env.verify(_issued(reply))
    on_13 = await _tls_unique_post(env, device, "1.3")
    assert on_13.status == 400 and "TLSv1.3" in on_13.text
    await env.serve(stack="openssl4")
    device_uuid, username, password = await env.credential()
    reply = await env.post_csr(
        "simpleenroll", make_csr(generate_private_key(), cn=device_uuid), auth=(username, password)
    )
    assert reply.status == 200, reply.text


async def test_online_ca_disabled_after_start_is_a_503_that_stores_nothing(env):
    await pki_admin.disable_device_ca(env.db_url, "online-ca", "acme")
    device_uuid, username, password = await env.credential()
    before = await env.counts()
    reply = await env.post_csr(
        "simpleenroll", make_csr(generate_private_key(), cn=device_uuid), auth=(username, password)
    )
    assert reply.status == 503
    assert "issuing CA 'online-ca' is disabled" in reply.text
    assert await env.counts() == before


def test_policy_from_server_settings():
    policy = EstPolicy.from_settings(
        {"validity_days": 90, "manual_approval": True, "trusted_proxies": ["10.0.0.0/8"]}
    )
    assert policy.validity == dt.timedelta(days=90) and policy.manual_approval
    assert policy.is_trusted_proxy("10.1.2.3") and not policy.is_trusted_proxy("127.0.0.1")
    assert not EstPolicy().serverkeygen_enabled and EstPolicy().max_body_bytes == 64 * 1024
    for bad, message in [
        ({"validity_days": "1y"}, "wrong type"),
        ({"retry_after": True}, "wrong type"),
        ({"serverkeygen": True}, "unknown EST setting(s) serverkeygen"),
        ({"trusted_proxies": ["proxy.local"]}, "trusted_proxies"),
        ({"validity_days": 0}, "validity must be positive"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            EstPolicy.from_settings(bad)


async def test_request_content_transfer_encoding_is_ignored(env):
    """RFC 8951: the body is base64 whatever the header says, and white space may be anywhere."""
    device = await env.device()
    for value in ("binary", "base64", "8bit"):
        body = base64.encodebytes(device.csr())  # 76-column lines
        headers = {"Content-Transfer-Encoding": value}
        reply = await env.request("POST", "simplereenroll", body, device=device, headers=headers)
        assert reply.status == 200, reply.text
