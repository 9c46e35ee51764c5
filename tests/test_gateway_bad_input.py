"""Hostile and malformed device requests: each gets its status and one-line reason, stores nothing.

Every case prepares what it needs (devices, a deny-list entry, a CA change, an
announced key), then the store's rows are counted, the request is sent, and
the counts must be unchanged. Certificates TLS would never let through
(expired, not yet valid) go straight to the service.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from certfleet.fleet import pki_admin
from certfleet.gateway.errors import GatewayError
from certfleet.pki.keys import (
    cert_sha256,
    generate_private_key,
    pubkey_sha256,
    public_key_pem,
)
from certfleet.store import certificates, denylist, devices
from certfleet.store.schema import CertStatus

from .est_fixtures import DeviceId, Reply
from .gateway_fixtures import GatewayEnv, running_gateway, subject_of

Send = Callable[[], Awaitable[Reply]]


@dataclass(frozen=True)
class Case:
    name: str
    prepare: Callable[[GatewayEnv], Awaitable[Send]]
    status: int
    fragment: str
    direct: bool = False  # sent to the service, not over TLS


CASES: list[Case] = []


def case(status: int, fragment: str, direct: bool = False) -> Callable:
    def register(prepare: Callable[[GatewayEnv], Awaitable[Send]]) -> Callable:
        CASES.append(Case(prepare.__name__, prepare, status, fragment, direct))
        return prepare

    return register


def call(env: GatewayEnv, method: str, path: str, device: DeviceId | None, **kwargs) -> Send:
    return lambda: env.call(method, path, device=device, **kwargs)


def raw(env: GatewayEnv, method: str, path: str, device: DeviceId, body: bytes) -> Send:
    return call(env, method, path, device, body=body, headers={"Content-Type": "application/json"})


def direct(coroutine_fn: Callable[[], Awaitable[object]]) -> Send:
    async def send() -> Reply:
        try:
            await coroutine_fn()
        except GatewayError as exc:
            return Reply(exc.status, {}, (exc.message + "\n").encode())
        raise AssertionError("the service accepted it")

    return send


def key_pem(key) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def event(**changes) -> dict:
    envelope = {
        "id": str(uuid.uuid4()),
        "deviceTime": "2026-11-23T10:00:00Z",
        "event": {"correlationId": "certs-1790000000", "success": True},
        "eventType": {"id": "CertRotationStarted", "version": 0},
    }
    envelope.update(changes)
    return envelope


async def announced(env: GatewayEnv) -> tuple[DeviceId, ec.EllipticCurvePrivateKey]:
    device = await env.device()
    key = generate_private_key()
    reply = await env.call(
        "PATCH", "/device", device=device, json_body={"next_pubkey": key_pem(key)}
    )
    assert reply.status == 200, reply.text
    return device, key


# -- who is asking ---------------------------------------------------------------------------


@case(401, "this endpoint needs the device's client certificate")
async def no_client_cert(env):
    return call(env, "GET", "/config", None)


@case(401, "this endpoint needs the device's client certificate")
async def no_client_cert_with_a_body(env):
    return call(env, "POST", "/events", None, json_body=[event()])


@case(403, "device cert expired at", direct=True)
async def expired_cert(env):
    device = await env.device()
    then = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)
    cert = env.issue(device.uuid, device.key, now=then, validity=dt.timedelta(days=30))
    await env.record(env.save_device(device.uuid, "acme", device.key, cert))
    return direct(lambda: env.service.config(cert, None))


@case(403, "device cert is not valid yet", direct=True)
async def cert_not_yet_valid(env):
    device = await env.device()
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=3)
    cert = env.issue(device.uuid, device.key, now=later)
    return direct(lambda: env.service.device(cert))


@case(403, "device cert is for factory 'globex' (its OU); this gateway serves 'acme'")
async def other_factorys_cert(env):
    return call(env, "GET", "/config", await env.device(factory="globex"))


@case(403, "device cert is for factory 'globex'")
async def other_factorys_offline_cert(env):
    return call(env, "GET", "/device", await env.offline_device(factory="globex"))


@case(403, "device cert is on the deny-list (serial")
async def denylisted_cert(env):
    device = await env.device()
    async with env.store.transaction() as session:
        await denylist.add_denied(session, cert_sha256(device.cert), reason="stolen")
    await env.service.denied.poll()
    return call(env, "GET", "/config", device)


@case(403, "device CA 'local-ca-1', which was revoked at")
async def revoked_ca_cert(env):
    device = await env.offline_device()
    assert (await env.call("GET", "/device", device=device)).status == 200
    await env.fleet(pki_admin.revoke_device_ca, env.pki["acme"], "local-ca-1", "acme")
    return call(env, "GET", "/config", device)


@case(403, "which was revoked at")
async def revoked_ca_new_device(env):
    await env.fleet(pki_admin.revoke_device_ca, env.pki["acme"], "local-ca-1", "acme")
    return call(env, "GET", "/config", await env.offline_device())


@case(403, "device CA local-ca-1 is disabled: it registers no new devices")
async def disabled_ca_new_device(env):
    await env.fleet(pki_admin.disable_device_ca, "local-ca-1", "acme")
    return call(env, "GET", "/device", await env.offline_device())


@case(403, "was deleted at")
async def deleted_device(env):
    device = await env.device()
    async with env.store.transaction() as session:
        await devices.soft_delete_device(session, device.uuid)
    return call(env, "GET", "/config", device)


@case(403, "was superseded; connect with the device's current certificate")
async def superseded_cert(env):
    device = await env.device()
    renewed = await env.renewed(device, record=True)
    async with env.store.transaction() as session:
        row = await certificates.get_certificate(session, cert_sha256(renewed.cert))
        await certificates.set_certificate_status(session, row.id, CertStatus.SUPERSEDED)
    return call(env, "GET", "/config", renewed)


@case(403, "device cert CN 'not-a-uuid' is not a device uuid")
async def cn_not_a_uuid(env):
    key = generate_private_key()
    subject = subject_of("not-a-uuid", "acme")
    cert = env.issue("not-a-uuid", key, ca="local-ca-1", subject=subject)
    return call(env, "GET", "/device", env.save_device("not-a-uuid", "acme", key, cert))


@case(403, "must have one CN (the device uuid) and one OU (the factory)")
async def subject_without_ou(env):
    key, device_uuid = generate_private_key(), str(uuid.uuid4())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_uuid)])
    cert = env.issue(device_uuid, key, ca="local-ca-1", subject=subject)
    return call(env, "GET", "/device", env.save_device(device_uuid, "acme", key, cert))


# -- the body ----------------------------------------------------------------------------------


@case(400, "request body is not valid JSON: Expecting property name")
async def malformed_json(env):
    return raw(env, "PATCH", "/device", await env.device(), b"{not json")


@case(400, "request body is empty: send a JSON object")
async def empty_body(env):
    return raw(env, "PATCH", "/device", await env.device(), b"")


@case(400, "request body is not UTF-8")
async def not_utf8(env):
    return raw(env, "POST", "/config/applied", await env.device(), b'{"version": "\xff\xfe"}')


@case(400, "request body is JSON nested too deeply")
async def deeply_nested_json(env):
    return raw(env, "POST", "/events", await env.device(), b"[" * 100_000 + b"]" * 100_000)


@case(400, "request body must be a JSON object, not a list")
async def list_instead_of_object(env):
    return call(env, "PATCH", "/device", await env.device(), json_body=["next_pubkey"])


@case(400, "next_pubkey must be a JSON string, not a number")
async def next_key_not_a_string(env):
    return call(env, "PATCH", "/device", await env.device(), json_body={"next_pubkey": 42})


@case(400, "request body has unknown field(s) colour (known: next_pubkey, replace)")
async def unknown_field(env):
    body = {"next_pubkey": key_pem(generate_private_key()), "colour": "red"}
    return call(env, "PATCH", "/device", await env.device(), json_body=body)


@case(400, "replace must be a JSON boolean, not a string")
async def replace_not_a_boolean(env):
    body = {"next_pubkey": key_pem(generate_private_key()), "replace": "yes"}
    return call(env, "PATCH", "/device", await env.device(), json_body=body)


@case(413, "request body of 2097152 bytes is over this gateway's limit of 1048576 bytes")
async def oversized_body(env):
    return raw(
        env, "POST", "/events", await env.device(), b"[" + b" " * (2 * 1024 * 1024 - 2) + b"]"
    )


@case(413, "chunked request body is over this gateway's limit of 1048576 bytes")
async def oversized_chunked_body(env):
    device = await env.device()

    async def chunks():
        for _ in range(40):
            yield b" " * 65536

    return call(env, "POST", "/events", device, body=chunks())


@case(413, "101 events in one request; send at most 100 per request")
async def too_many_events(env):
    return call(env, "POST", "/events", await env.device(), json_body=[event() for _ in range(101)])


@case(400, "request body must be a JSON list of events, not an object")
async def events_not_a_list(env):
    return call(env, "POST", "/events", await env.device(), json_body={"events": [event()]})


@case(400, "events[1].id must be a JSON string, not a number")
async def event_id_not_a_string(env):
    return call(env, "POST", "/events", await env.device(), json_body=[event(), event(id=7)])


@case(400, "events[0].id must be 1 to 128 characters, not 129")
async def event_id_too_long(env):
    return call(env, "POST", "/events", await env.device(), json_body=[event(id="x" * 129)])


@case(400, "events[0].event needs the field correlationId")
async def event_without_correlation_id(env):
    body = [event(event={"success": True})]
    return call(env, "POST", "/events", await env.device(), json_body=body)


@case(400, "events[0].event.success must be a JSON boolean, not a string")
async def event_success_not_a_boolean(env):
    body = [event(event={"correlationId": "certs-1", "success": "true"})]
    return call(env, "POST", "/events", await env.device(), json_body=body)


@case(400, "events[0].deviceTime 'yesterday' is not an RFC 3339 time")
async def event_with_a_bad_time(env):
    return call(
        env, "POST", "/events", await env.device(), json_body=[event(deviceTime="yesterday")]
    )


@case(400, "events[0].deviceTime '0001-01-01T00:00:00+01:00' is out of range")
async def event_with_a_time_before_year_one_in_utc(env):
    body = [event(deviceTime="0001-01-01T00:00:00+01:00")]
    return call(env, "POST", "/events", await env.device(), json_body=body)


@case(400, "request body has a string with a NUL character")
async def event_target_with_a_nul(env):
    body = [event(event={"correlationId": "certs-1", "success": True, "targetName": "a\u0000b"})]
    return call(env, "POST", "/events", await env.device(), json_body=body)


@case(400, "request body has a string with an unpaired surrogate ('\\ud800')")
async def event_details_with_a_lone_surrogate(env):
    body = [event(event={"correlationId": "certs-1", "details": "x\ud800y"})]
    return call(env, "POST", "/events", await env.device(), json_body=body)


@case(400, "request body has a string with a NUL character")
async def event_id_with_a_nul(env):
    return call(env, "POST", "/events", await env.device(), json_body=[event(id="a\u0000")])


@case(400, "request body has a string with an unpaired surrogate")
async def applied_version_with_a_lone_surrogate(env):
    body = {"version": "\udfff"}
    return call(env, "POST", "/config/applied", await env.device(), json_body=body)


@case(400, "next_pubkey: unsupported key type RSA")
async def next_key_rsa(env):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return call(
        env, "PATCH", "/device", await env.device(), json_body={"next_pubkey": key_pem(key)}
    )


@case(400, "next_pubkey: unsupported key type Ed25519")
async def next_key_ed25519(env):
    key = ed25519.Ed25519PrivateKey.generate()
    return call(
        env, "PATCH", "/device", await env.device(), json_body={"next_pubkey": key_pem(key)}
    )


@case(400, "next_pubkey: unsupported curve secp521r1: use one of P-256, P-384")
async def next_key_p521(env):
    key = ec.generate_private_key(ec.SECP521R1())
    return call(
        env, "PATCH", "/device", await env.device(), json_body={"next_pubkey": key_pem(key)}
    )


@case(400, "next_pubkey is not a PEM public key")
async def next_key_garbage_pem(env):
    body = {"next_pubkey": "-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n"}
    return call(env, "PATCH", "/device", await env.device(), json_body=body)


@case(400, "next_pubkey is not a PEM public key")
async def next_key_is_a_private_key(env):
    private = generate_private_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return call(
        env, "PATCH", "/device", await env.device(), json_body={"next_pubkey": private.decode()}
    )


@case(400, "next_pubkey is the key of the certificate this request came with")
async def next_key_equal_to_current(env):
    device = await env.device()
    body = {"next_pubkey": public_key_pem(device.key.public_key())}
    return call(env, "PATCH", "/device", device, json_body=body)


@case(409, "another next key (sha256 ")
async def another_next_key_without_replace(env):
    device, _ = await announced(env)
    return call(
        env, "PATCH", "/device", device, json_body={"next_pubkey": key_pem(generate_private_key())}
    )


@case(400, "give ?sha256=<hex SHA-256 of the next key's SubjectPublicKeyInfo> to withdraw")
async def withdraw_without_sha256(env):
    device, _ = await announced(env)
    return call(env, "DELETE", "/device/next-key", device)


@case(400, "sha256 must be 64 hex digits")
async def withdraw_with_a_bad_sha256(env):
    device, _ = await announced(env)
    return call(env, "DELETE", "/device/next-key?sha256=abc", device)


@case(409, "nothing withdrawn")
async def withdraw_another_key(env):
    device, _ = await announced(env)
    other = pubkey_sha256(generate_private_key().public_key())
    return call(env, "DELETE", f"/device/next-key?sha256={other}", device)


@case(401, "this endpoint needs the device's client certificate")
async def withdraw_without_client_cert(env):
    _, key = await announced(env)
    return call(env, "DELETE", f"/device/next-key?sha256={pubkey_sha256(key.public_key())}", None)


@case(409, "no next key is announced: PATCH /device with next_pubkey first")
async def config_upload_without_announced_key(env):
    body = {"files": {}, "next_pubkey": key_pem(generate_private_key())}
    return call(env, "PATCH", "/config", await env.device(), json_body=body)


@case(409, "is not the announced next key")
async def config_upload_for_another_key(env):
    device, _ = await announced(env)
    body = {"files": {}, "next_pubkey": key_pem(generate_private_key())}
    return call(env, "PATCH", "/config", device, json_body=body)


@case(400, "config file name 'etc/passwd' is not allowed")
async def config_file_name_with_a_slash(env):
    device, key = await announced(env)
    body = {
        "files": {"etc/passwd": {"Value": "x", "Unencrypted": True}},
        "next_pubkey": key_pem(key),
    }
    return call(env, "PATCH", "/config", device, json_body=body)


@case(400, "config file name '..' is not allowed")
async def config_file_name_dot_dot(env):
    device, key = await announced(env)
    body = {"files": {"..": {"Value": "x", "Unencrypted": True}}, "next_pubkey": key_pem(key)}
    return call(env, "PATCH", "/config", device, json_body=body)


@case(400, "files['wifi'].Value must be a JSON string, not a number")
async def config_value_not_a_string(env):
    device, key = await announced(env)
    body = {"files": {"wifi": {"Value": 12}}, "next_pubkey": key_pem(key)}
    return call(env, "PATCH", "/config", device, json_body=body)


@case(400, "files['wifi'].Value is not base64 ECIES ciphertext; set Unencrypted for a clear value")
async def config_value_in_clear_marked_encrypted(env):
    device, key = await announced(env)
    body = {"files": {"wifi": {"Value": "my psk!"}}, "next_pubkey": key_pem(key)}
    return call(env, "PATCH", "/config", device, json_body=body)


@case(400, "files['wifi'].OnChanged[0] must be a JSON string, not a list")
async def config_on_changed_not_strings(env):
    device, key = await announced(env)
    file = {"Value": "x", "Unencrypted": True, "OnChanged": [["/bin/sh"]]}
    body = {"files": {"wifi": file}, "next_pubkey": key_pem(key)}
    return call(env, "PATCH", "/config", device, json_body=body)


@case(400, "request body needs the field version")
async def applied_without_version(env):
    return call(env, "POST", "/config/applied", await env.device(), json_body={})


# -- routing ---------------------------------------------------------------------------------


@case(404, "/firmware is not a gateway path (paths: /config, /config-device")
async def unknown_route(env):
    return call(env, "GET", "/firmware", await env.device())


@case(405, "/config takes GET, HEAD, PATCH, not DELETE")
async def wrong_method(env):
    return call(env, "DELETE", "/config", await env.device())


@case(405, "/events takes POST, not GET")
async def get_on_events(env):
    return call(env, "GET", "/events", await env.device())


# -- the table ---------------------------------------------------------------------------------


@pytest.fixture
async def env(db_url, tmp_path):
    async with running_gateway(db_url, tmp_path) as running:
        yield running


def test_the_table_is_big_enough():
    assert len(CASES) >= 20
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("bad", CASES, ids=lambda c: c.name)
async def test_refused_with_reason_and_nothing_stored(env, bad, caplog):
    send = await bad.prepare(env)
    before = await env.counts()
    caplog.set_level(logging.INFO, logger="certfleet.gateway")
    reply = await send()
    assert reply.status == bad.status, reply.text
    assert bad.fragment in reply.text
    assert reply.text.endswith("\n") and reply.text.count("\n") == 1, "one line"
    assert await env.counts() == before
    if bad.direct:
        return
    assert reply.headers["Content-Type"].startswith("text/plain")
    assert reply.headers["X-Certfleet-Error"]
    assert reply.headers["X-Certfleet-Worker"].isdigit()
    logged = [r for r in caplog.records if f"refused {bad.status}" in r.getMessage()]
    assert logged and logged[0].levelno == logging.INFO


async def test_a_refused_body_leaves_the_device_row_as_it_was(env):
    device = await env.device()
    before = await env.device_row(device.uuid)
    reply = await env.call("PATCH", "/device", device=device, json_body={"next_pubkey": "x"})
    assert reply.status == 400
    after = await env.device_row(device.uuid)
    assert (after.next_pubkey_pem, after.config_locked, after.current_cert_id) == (
        before.next_pubkey_pem,
        before.config_locked,
        before.current_cert_id,
    )
    assert (
        json.loads((await env.call("GET", "/device", device=device)).body)["config_locked"] is False
    )


def test_gateway_settings_refuse_unknown_names_and_wrong_types():
    from certfleet.gateway.policy import GatewayPolicy

    assert GatewayPolicy.from_settings({"max_events": 50}).max_events == 50
    with pytest.raises(ValueError, match="unknown gateway setting"):
        GatewayPolicy.from_settings({"max_event": 50})
    with pytest.raises(ValueError, match="has the wrong type"):
        GatewayPolicy.from_settings({"max_body_bytes": True})
    with pytest.raises(ValueError, match="at least 1024"):
        GatewayPolicy(max_body_bytes=10)
