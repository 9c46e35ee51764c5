"""Certificates EST issued for a rotation that never used them are denied at the key change.

A lost EST answer makes the device ask again and get a second certificate for
the same new key; a rotation that failed after re-enrolling leaves a
certificate for a key the device dropped. When the device connects with its
new key, the gateway supersedes and deny-lists those too, in the transaction
of the key change. Real EST server, real gateway, real store (SQLite and
PostgreSQL).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import pytest

from certfleet.events import names
from certfleet.pki.keys import cert_sha256, generate_private_key, public_key_pem
from certfleet.store import audit, certificates, denylist
from certfleet.store.schema import CertStatus

from .est_fixtures import DeviceId
from .gateway_fixtures import GatewayEnv, running_gateway


@pytest.fixture
async def env(db_url, tmp_path):
    async with running_gateway(db_url, tmp_path) as running:
        await running.serve()  # the EST server, next to the gateway
        yield running


def serial(device: DeviceId) -> str:
    return f"{device.cert.serial_number:x}"


def unused_reason(current: DeviceId) -> str:
    return f"unused: issued for a rotation, replaced by key change to {serial(current)}"


async def reenroll(env: GatewayEnv, device: DeviceId, key, csr: bytes | None = None) -> DeviceId:
    """simplereenroll with the device's current certificate: a certificate for `key`."""
    reply = await env.post_csr("simplereenroll", csr or device.csr(key=key), device=device)
    return env.save_device(device.uuid, device.factory, key, reply.certs()[0])


async def announce(env: GatewayEnv, device: DeviceId, key, *, replace: bool = False) -> None:
    body = {"next_pubkey": public_key_pem(key.public_key()), "replace": replace}
    reply = await env.call("PATCH", "/device", device=device, json_body=body)
    assert reply.status == 200, reply.text


async def status(env: GatewayEnv, device: DeviceId) -> str:
    async with env.store.transaction() as session:
        return (await certificates.get_certificate(session, cert_sha256(device.cert))).status


async def denied_reasons(env: GatewayEnv, device_uuid: str) -> dict[str, str]:
    async with env.store.transaction() as session:
        entries = await denylist.list_denied(session, device_uuid=device_uuid)
    return {entry.cert_sha256: entry.reason for entry in entries}


async def key_change_audit(env: GatewayEnv, device_uuid: str) -> list[dict]:
    async with env.store.transaction() as session:
        entries = await audit.list_audit(session, target=device_uuid)
    return [entry.details for entry in entries if entry.action == "device.key-change"]


async def assert_refused_as_denied(env: GatewayEnv, device: DeviceId) -> None:
    reply = await env.call("GET", "/config", device=device)
    assert reply.status == 403 and reply.headers["X-Certfleet-Error"] == "denied"
    assert f"device cert is on the deny-list (serial {serial(device)})" in reply.text


async def test_a_second_certificate_for_the_new_key_is_denied_when_the_device_switches(env):
    device = await env.device()
    new_key = generate_private_key()
    csr = device.csr(key=new_key)
    lost = await reenroll(env, device, new_key, csr)  # its answer never reached the disk
    kept = await reenroll(env, device, new_key, csr)  # the repeat, with the same CSR
    assert serial(lost) != serial(kept)
    assert lost.cert.public_key() == kept.cert.public_key()
    await announce(env, device, new_key)

    reply = await env.call("GET", "/config", device=kept)
    assert reply.status == 200, reply.text

    await assert_refused_as_denied(env, lost)
    assert await status(env, lost) == CertStatus.SUPERSEDED
    assert await denied_reasons(env, device.uuid) == {
        cert_sha256(device.cert): "replaced by key change",
        cert_sha256(lost.cert): unused_reason(kept),
    }
    events = await env.events(names.DENYLIST_ADDED, device.uuid)
    by_sha256 = {event.payload["sha256"]: event.payload for event in events}
    assert len(events) == 2 and set(by_sha256) == {cert_sha256(device.cert), cert_sha256(lost.cert)}
    unused = by_sha256[cert_sha256(lost.cert)]
    assert set(unused) == set(by_sha256[cert_sha256(device.cert)])
    assert unused["serial"] == serial(lost) and unused["uuid"] == device.uuid
    assert unused["reason"] == unused_reason(kept) and unused["time"].endswith("Z")
    assert len(await env.events(names.DEVICE_PUBKEY_CHANGE, device.uuid)) == 1
    [details] = await key_change_audit(env, device.uuid)
    assert details["unused_serials"] == [serial(lost)]
    assert details["new_sha256"] == cert_sha256(kept.cert)


async def test_a_certificate_for_a_key_never_used_is_denied_at_the_next_key_change(env):
    device = await env.device()
    # A rotation that failed after re-enrolling and announcing: the device dropped that key.
    dropped_key = generate_private_key()
    dropped = await reenroll(env, device, dropped_key)
    await announce(env, device, dropped_key)
    # The next rotation, with another key, goes through.
    new_key = generate_private_key()
    renewed = await reenroll(env, device, new_key)
    await announce(env, device, new_key, replace=True)
    refused = await env.call("GET", "/device", device=dropped)
    assert refused.status == 403 and "not the next key the device announced" in refused.text

    reply = await env.call("GET", "/device", device=renewed)
    assert reply.status == 200, reply.text

    await assert_refused_as_denied(env, dropped)
    assert await status(env, dropped) == CertStatus.SUPERSEDED
    reasons = await denied_reasons(env, device.uuid)
    assert reasons[cert_sha256(dropped.cert)] == unused_reason(renewed)
    assert reasons[cert_sha256(device.cert)] == "replaced by key change"
    events = await env.events(names.DENYLIST_ADDED, device.uuid)
    assert [e.payload["sha256"] for e in events].count(cert_sha256(dropped.cert)) == 1
    [details] = await key_change_audit(env, device.uuid)
    assert details["unused_serials"] == [serial(dropped)]


async def test_the_new_certificate_is_not_denied_and_keeps_working(env):
    device = await env.device()
    other = await env.device()
    others_unused = await reenroll(env, other, generate_private_key())
    new_key = generate_private_key()
    spare = await reenroll(env, device, new_key)
    renewed = await reenroll(env, device, new_key)
    await announce(env, device, new_key)

    for _ in range(3):
        reply = await env.call("GET", "/config", device=renewed)
        assert reply.status == 200, reply.text
    view = json.loads((await env.call("GET", "/device", device=renewed)).body)
    assert view["cert"]["sha256"] == cert_sha256(renewed.cert)
    assert await status(env, renewed) == CertStatus.ACTIVE
    assert cert_sha256(renewed.cert) not in await denied_reasons(env, device.uuid)
    await assert_refused_as_denied(env, spare)
    # Another device's certificates are none of this key change's business.
    assert await status(env, others_unused) == CertStatus.ACTIVE
    assert await denied_reasons(env, other.uuid) == {}

    # The next rotation starts from the new certificate: it re-enrolls and switches as usual.
    next_key = generate_private_key()
    third = await reenroll(env, renewed, next_key)
    await announce(env, renewed, next_key)
    assert (await env.call("GET", "/config", device=third)).status == 200
    await assert_refused_as_denied(env, renewed)
    reasons = await denied_reasons(env, device.uuid)
    assert reasons[cert_sha256(renewed.cert)] == "replaced by key change"
    assert cert_sha256(third.cert) not in reasons
    assert [d["unused_serials"] for d in await key_change_audit(env, device.uuid)] == [
        [],
        [serial(spare)],
    ]


async def test_parallel_first_requests_deny_the_unused_certificate_once(env):
    device = await env.device()
    new_key = generate_private_key()
    csr = device.csr(key=new_key)
    lost = await reenroll(env, device, new_key, csr)
    kept = await reenroll(env, device, new_key, csr)
    await announce(env, device, new_key)

    replies = await asyncio.gather(*(env.call("GET", "/config", device=kept) for _ in range(6)))
    assert [r.status for r in replies] == [200] * 6, [r.text for r in replies]
    assert len(await env.events(names.DEVICE_PUBKEY_CHANGE, device.uuid)) == 1
    events = await env.events(names.DENYLIST_ADDED, device.uuid)
    assert sorted(e.payload["sha256"] for e in events) == sorted(
        [cert_sha256(device.cert), cert_sha256(lost.cert)]
    )
    assert len(await key_change_audit(env, device.uuid)) == 1
    await assert_refused_as_denied(env, lost)


async def test_an_expired_leftover_is_left_alone(env):
    device = await env.device()
    key = generate_private_key()
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    cert = env.issue(device.uuid, key, now=long_ago, validity=dt.timedelta(days=1))
    expired = await env.record(env.save_device(device.uuid, "acme", key, cert), make_current=False)
    new_key = generate_private_key()
    renewed = await reenroll(env, device, new_key)
    await announce(env, device, new_key)

    assert (await env.call("GET", "/device", device=renewed)).status == 200
    # TLS and the gateway refuse it by its dates; the deny-list, never pruned, does not need it.
    assert expired.sha256 not in await denied_reasons(env, device.uuid)
    [details] = await key_change_audit(env, device.uuid)
    assert details["unused_serials"] == []
