"""The device gateway end to end: real TLS on loopback, a real store, the real CLI and curl.

Registration on first use, encrypted config a device decrypts, If-Modified-Since,
the key change with its config lock, refused keys, update events and applied
config reports.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import uuid

import pytest

from certfleet.events import names
from certfleet.fleet import config_admin, pki_admin
from certfleet.pki import ecies
from certfleet.pki.keys import cert_sha256, generate_private_key, pubkey_sha256, public_key_pem
from certfleet.store import audit, denylist, updates
from certfleet.store.config_files import ConfigValue
from certfleet.store.schema import ConfigScope, RegisteredVia, UpdateStatus

from .cli_run import certfleet as certfleet_blocking
from .est_fixtures import DeviceId, run_shell
from .gateway_fixtures import GatewayEnv, running_gateway


async def cli(*args: str, **kwargs):
    """The real CLI in a thread: a blocked loop would stall the gateway mid-transaction."""
    return await asyncio.to_thread(certfleet_blocking, *args, **kwargs)


@pytest.fixture
async def env(db_url, tmp_path):
    async with running_gateway(db_url, tmp_path) as running:
        yield running


def decrypt(device: DeviceId, value: str) -> str:
    exchange = ecies.key_exchange(device.key)
    return ecies.decrypt_b64(exchange, device.key.curve, value).decode()


def pem(device: DeviceId) -> str:
    return public_key_pem(device.key.public_key())


async def set_files(env: GatewayEnv, scope: ConfigScope, key: str, **values: str) -> None:
    files = {name: ConfigValue(value, ["/usr/bin/reload"]) for name, value in values.items()}
    await env.fleet(
        config_admin.set_config, scope, key, files, reason="test", actor="test", factory="acme"
    )


# -- registration on first use ---------------------------------------------------------------


async def test_offline_ca_device_registers_on_its_first_request(env):
    device = await env.offline_device()
    reply = await env.call("GET", "/device", device=device)
    assert reply.status == 200, reply.text
    view = json.loads(reply.body)
    assert view["uuid"] == device.uuid and view["factory"] == "acme"
    assert view["registered_via"] == RegisteredVia.LOCAL_CA
    assert view["cert"]["sha256"] == cert_sha256(device.cert)
    assert not view["config_locked"] and not view["next_pubkey_announced"]
    row = await env.device_row(device.uuid)
    assert row.current_cert_id is not None and row.last_seen_at is not None
    registered = await env.events(names.DEVICE_REGISTERED, device.uuid)
    assert len(registered) == 1
    assert registered[0].payload["ca"] == "local-ca-1"

    before = await env.counts()
    assert (await env.call("GET", "/config", device=device)).status == 200
    assert await env.counts() == before, "the second request registers nothing"


async def test_a_disabled_ca_registers_no_new_devices_but_keeps_its_old_ones(env):
    known = await env.offline_device()
    assert (await env.call("GET", "/device", device=known)).status == 200
    await env.fleet(pki_admin.disable_device_ca, "local-ca-1", "acme")
    newcomer = await env.offline_device()
    before = await env.counts()
    reply = await env.call("GET", "/device", device=newcomer)
    assert reply.status == 403
    assert "device CA local-ca-1 is disabled: it registers no new devices" in reply.text
    assert await env.counts() == before
    assert (await env.call("GET", "/device", device=known)).status == 200


async def test_the_pyopenssl_stack_serves_the_same_answers(env):
    await env.serve_gateway(stack="openssl4")
    device = await env.offline_device()
    reply = await env.call("GET", "/device", device=device)
    assert reply.status == 200, reply.text
    assert reply.headers["X-Certfleet-Worker"].isdigit()
    reply = await env.call("GET", "/config")
    assert reply.status == 401
    assert reply.text == "this endpoint needs the device's client certificate\n"


# -- config ---------------------------------------------------------------------------------


async def test_merged_config_is_encrypted_for_the_device_which_decrypts_every_value(env):
    device = await env.device()
    await env.set_group(device.uuid, "lab")
    await set_files(env, ConfigScope.FACTORY, "", shared="factory", only_factory="f")
    await set_files(env, ConfigScope.GROUP, "lab", shared="group", only_group="g")
    await set_files(env, ConfigScope.GROUP, "other", only_other="never seen")
    await set_files(env, ConfigScope.DEVICE, device.uuid, shared="device", only_device="d")
    await env.fleet(
        config_admin.set_config,
        ConfigScope.FACTORY,
        "",
        {"motd": ConfigValue("hello", [], unencrypted=True)},
        reason="clear",
        actor="test",
        factory="acme",
    )

    reply = await env.call("GET", "/config", device=device)
    assert reply.status == 200, reply.text
    assert reply.headers["Content-Type"].startswith("application/json")
    files = json.loads(reply.body)
    assert sorted(files) == ["motd", "only_device", "only_factory", "only_group", "shared"]
    assert files["motd"] == {"Value": "hello", "OnChanged": [], "Unencrypted": True}
    clear = {name: decrypt(device, f["Value"]) for name, f in files.items() if name != "motd"}
    assert clear == {"shared": "device", "only_device": "d", "only_factory": "f", "only_group": "g"}
    assert all(f["OnChanged"] == ["/usr/bin/reload"] for n, f in files.items() if n != "motd")
    assert all(f["Unencrypted"] is False for n, f in files.items() if n != "motd")

    # The same request from curl, a foreign client.
    code, out, err = await run_shell(
        f"curl -sS --fail --cacert {env.root()} --cert {device.cert_path} "
        f"--key {device.key_path} {env.gateway_url('/config')}"
    )
    assert code == 0, err
    assert decrypt(device, json.loads(out)["only_group"]["Value"]) == "g"

    reply = await env.call("GET", "/config-device", device=device)
    assert reply.status == 200
    stored = json.loads(reply.body)
    assert sorted(stored) == ["only_device", "shared"]
    assert decrypt(device, stored["shared"]["Value"]) == "device"


async def test_if_modified_since_gives_304_until_the_operator_changes_something(env):
    device = await env.device()
    await set_files(env, ConfigScope.FACTORY, "", motd="one")
    last_modified = await settled_last_modified(env, device)

    before = await env.counts()
    reply = await env.call(
        "GET", "/config", device=device, headers={"If-Modified-Since": last_modified}
    )
    assert reply.status == 304 and reply.body == b""
    assert reply.headers["Last-Modified"] == last_modified
    assert await env.counts() == before

    code, out, _ = await run_shell(
        f"curl -sS -o /dev/null -w '%{{http_code}}' --cacert {env.root()} "
        f"--cert {device.cert_path} --key {device.key_path} "
        f"-H 'If-Modified-Since: {last_modified}' {env.gateway_url('/config')}"
    )
    assert out == b"304"

    await asyncio.sleep(1.1)
    await set_files(env, ConfigScope.FACTORY, "", motd="two")
    # Workers answer 304s from memory and see a change made elsewhere within a poll.
    reply = await config_changed_within(env, device, last_modified, seconds=1.0)
    assert reply.status == 200
    assert decrypt(device, json.loads(reply.body)["motd"]["Value"]) == "two"
    newer = email.utils.parsedate_to_datetime(reply.headers["Last-Modified"])
    assert newer > email.utils.parsedate_to_datetime(last_modified)


async def config_changed_within(env: GatewayEnv, device: DeviceId, since: str, seconds: float):
    """The first answer to GET /config (If-Modified-Since `since`) that is not 304."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        headers = {"If-Modified-Since": since}
        reply = await env.call("GET", "/config", device=device, headers=headers)
        if reply.status != 304 or asyncio.get_running_loop().time() > deadline:
            return reply
        await asyncio.sleep(0.05)


async def settled_last_modified(env: GatewayEnv, device: DeviceId) -> str:
    """The Last-Modified a device keeps once the second of the last change is over."""
    # While the change's second lasts, the gateway announces the second before
    # it (see gateway.config.version): a 304 then would not last.
    await asyncio.sleep(1.1)
    for _ in range(4):
        reply = await env.call("GET", "/config", device=device)
        assert reply.status == 200
        again = await env.call(
            "GET",
            "/config",
            device=device,
            headers={"If-Modified-Since": reply.headers["Last-Modified"]},
        )
        if again.status == 304:
            return reply.headers["Last-Modified"]
        await asyncio.sleep(0.6)
    raise AssertionError("config never answered 304")


async def test_a_deleted_file_counts_as_a_change(env):
    device = await env.device()
    await set_files(env, ConfigScope.DEVICE, device.uuid, a="1", b="2")
    last_modified = await settled_last_modified(env, device)
    await asyncio.sleep(1.1)
    keep = json.loads((await env.call("GET", "/config-device", device=device)).body)["a"]
    files = {"a": {"Value": keep["Value"], "OnChanged": keep["OnChanged"]}}
    new = generate_private_key()
    await env.call("PATCH", "/device", device=device, json_body={"next_pubkey": pem_of(new)})
    reply = await env.call(
        "PATCH", "/config", device=device, json_body={"files": files, "next_pubkey": pem_of(new)}
    )
    assert reply.status == 200, reply.text
    reply = await env.call(
        "GET", "/config", device=device, headers={"If-Modified-Since": last_modified}
    )
    assert reply.status == 200 and sorted(json.loads(reply.body)) == ["a"]


def pem_of(key) -> str:
    return public_key_pem(key.public_key())


# -- the key change -------------------------------------------------------------------------


async def test_key_change_locks_config_then_moves_the_device_to_its_new_key(env):
    device = await env.device()
    await set_files(env, ConfigScope.DEVICE, device.uuid, wifi="secret-psk", token="t0k3n")
    await set_files(env, ConfigScope.FACTORY, "", motd="hi")
    new_key = generate_private_key()

    # Step 2 of the reference: announce the next key, which locks the device's config.
    reply = await env.call(
        "PATCH", "/device", device=device, json_body={"next_pubkey": pem_of(new_key)}
    )
    assert reply.status == 200, reply.text
    view = json.loads(reply.body)
    assert view["config_locked"] and view["next_pubkey_announced"]
    again = await env.call(
        "PATCH", "/device", device=device, json_body={"next_pubkey": pem_of(new_key)}
    )
    assert again.status == 200, "announcing the same key again is harmless"

    refused = await cli(
        "config", "set", "--device", device.uuid, "wifi=changed", "--reason", "test",
        "--database", env.db_url, expect=2,
    )  # fmt: skip
    assert f"device {device.uuid} is rotating its key (next key announced at " in refused.stderr
    assert "config changes wait until it connects with the new key" in refused.stderr
    # Group and factory files are encrypted per request, so they stay open to the operator.
    await cli(
        "config", "set", "--factory-wide", "motd=still open", "--reason", "test",
        "--factory", "acme", "--database", env.db_url,
    )  # fmt: skip

    # Step 4: the device re-encrypts its own device files for the new key and uploads them.
    stored = json.loads((await env.call("GET", "/config-device", device=device)).body)
    upload = {
        name: {
            "Value": ecies.encrypt_b64(new_key.public_key(), decrypt(device, f["Value"]).encode()),
            "OnChanged": f["OnChanged"],
            "Unencrypted": False,
        }
        for name, f in stored.items()
    }
    body = {"files": upload, "next_pubkey": pem_of(new_key)}
    reply = await env.call("PATCH", "/config", device=device, json_body=body)
    assert reply.status == 200, reply.text
    assert json.loads(reply.body)["changed"] is True
    retry = await env.call("PATCH", "/config", device=device, json_body=body)
    assert retry.status == 200 and json.loads(retry.body)["changed"] is False

    # The device connects with a certificate for its new key from the online CA.
    renewed = await env.renewed(device, key=new_key)
    reply = await env.call("GET", "/config", device=renewed)
    assert reply.status == 200, reply.text
    files = json.loads(reply.body)
    assert decrypt(renewed, files["wifi"]["Value"]) == "secret-psk"
    assert decrypt(renewed, files["token"]["Value"]) == "t0k3n"
    assert decrypt(renewed, files["motd"]["Value"]) == "still open"

    view = json.loads((await env.call("GET", "/device", device=renewed)).body)
    assert view["cert"]["sha256"] == cert_sha256(renewed.cert)
    assert not view["config_locked"] and not view["next_pubkey_announced"]

    old = await env.call("GET", "/config", device=device)
    assert old.status == 403
    assert f"device cert is on the deny-list (serial {device.cert.serial_number:x})" in old.text
    async with env.store.transaction() as session:
        assert await denylist.is_denied(session, cert_sha256(device.cert))
        entry = (await denylist.list_denied(session, device_uuid=device.uuid))[0]
        assert entry.reason == "replaced by key change"

    changes = await env.events(names.DEVICE_PUBKEY_CHANGE, device.uuid)
    assert len(changes) == 1
    payload = changes[0].payload
    assert payload["uuid"] == device.uuid and payload["time"].endswith("Z")
    assert payload["old_pubkey"] == pem(device) and payload["new_pubkey"] == pem(renewed)
    assert "group" in payload
    denied = await env.events(names.DENYLIST_ADDED, device.uuid)
    assert [e.payload["sha256"] for e in denied] == [cert_sha256(device.cert)]
    assert denied[0].payload["reason"] == "replaced by key change"

    # The lock is lifted: the operator's device change goes through, encrypted to the new key.
    done = await cli(
        "config", "set", "--device", device.uuid, "wifi=changed", "--reason", "test",
        "--database", env.db_url,
    )  # fmt: skip
    assert "encrypted to its current key" in done.stdout
    files = json.loads((await env.call("GET", "/config", device=renewed)).body)
    assert decrypt(renewed, files["wifi"]["Value"]) == "changed"
    log = await cli("config", "log", "--device", device.uuid, "--json", "--database", env.db_url)
    assert [c["changed_by"] for c in json.loads(log.stdout)][:2] == ["cli", f"device:{device.uuid}"]


async def test_key_change_with_a_certificate_renewed_through_est(env):
    device = await env.device()
    await env.serve()  # the EST server, next to the gateway
    new_key = generate_private_key()
    reply = await env.post_csr("simplereenroll", device.csr(key=new_key), device=device)
    renewed = env.save_device(device.uuid, "acme", new_key, reply.certs()[0])
    # EST records the new certificate, but it is not current before the device uses it.
    early = await env.call("GET", "/device", device=renewed)
    assert early.status == 403
    assert "not the next key the device announced" in early.text

    reply = await env.call(
        "PATCH", "/device", device=device, json_body={"next_pubkey": pem(renewed)}
    )
    assert reply.status == 200
    reply = await env.call("GET", "/device", device=renewed)
    assert reply.status == 200, reply.text
    assert json.loads(reply.body)["cert"]["serial"] == f"{renewed.cert.serial_number:x}"
    assert (await env.call("GET", "/device", device=device)).status == 403


async def test_a_certificate_for_another_key_is_refused_and_raises_an_alert(env):
    device = await env.device()
    announced = generate_private_key()
    reply = await env.call(
        "PATCH", "/device", device=device, json_body={"next_pubkey": pem_of(announced)}
    )
    assert reply.status == 200
    intruder = await env.renewed(device)  # a valid certificate, but for another key

    before = await env.counts()
    reply = await env.call("GET", "/config", device=intruder)
    assert reply.status == 403
    assert "this certificate's key is not the next key the device announced" in reply.text
    after = await env.counts()
    assert after["outbox"] == before["outbox"] + 1
    assert {k: v for k, v in after.items() if k != "outbox"} == {
        k: v for k, v in before.items() if k != "outbox"
    }
    alerts = await env.events(names.NEXT_KEY_REFUSED, device.uuid)
    assert len(alerts) == 1
    assert alerts[0].payload["sha256"] == cert_sha256(intruder.cert)
    assert alerts[0].payload["announced_pubkey_sha256"] is not None

    # Nothing else changed: the device still works with its old certificate, still locked.
    view = json.loads((await env.call("GET", "/device", device=device)).body)
    assert view["cert"]["sha256"] == cert_sha256(device.cert) and view["config_locked"]


async def test_announcing_another_next_key_needs_replace(env):
    device = await env.device()
    first, second = generate_private_key(), generate_private_key()
    assert (
        await env.call("PATCH", "/device", device=device, json_body={"next_pubkey": pem_of(first)})
    ).status == 200
    reply = await env.call(
        "PATCH", "/device", device=device, json_body={"next_pubkey": pem_of(second)}
    )
    assert reply.status == 409
    assert '"replace": true' in reply.text
    body = {"next_pubkey": pem_of(second), "replace": True}
    reply = await env.call("PATCH", "/device", device=device, json_body=body)
    assert reply.status == 200
    row = await env.device_row(device.uuid)
    assert row.next_pubkey_pem == pem_of(second) and row.config_locked


async def test_a_withdrawn_next_key_unlocks_config_and_is_refused_afterwards(env):
    device = await env.device()
    new_key = generate_private_key()
    wanted = pubkey_sha256(new_key.public_key())
    body = {"next_pubkey": pem_of(new_key)}
    assert (await env.call("PATCH", "/device", device=device, json_body=body)).status == 200

    # curl and openssl, as docs/gateway.md shows it: the fingerprint is of the SPKI DER.
    next_pub = device.key_path.parent / "next.pub"
    next_pub.write_text(pem_of(new_key))
    sha256 = f"$(openssl pkey -pubin -in {next_pub} -outform DER | sha256sum | cut -c1-64)"
    code, out, err = await run_shell(
        f"curl -sS --fail -X DELETE --cacert {env.root()} --cert {device.cert_path} "
        f'--key {device.key_path} "{env.gateway_url("/device/next-key")}?sha256={sha256}"'
    )
    assert code == 0, err
    view = json.loads(out)
    assert view["withdrawn"] is True
    assert not view["config_locked"] and view["next_pubkey_sha256"] is None
    row = await env.device_row(device.uuid)
    assert (row.config_locked, row.next_pubkey_sha256, row.next_pubkey_pem) == (False, None, None)
    path = f"/device/next-key?sha256={wanted.upper()}"
    again = await env.call("DELETE", path, device=device)
    assert again.status == 200 and json.loads(again.body)["withdrawn"] is False

    # The operator's device config goes through again, and the withdrawn key is refused.
    await cli(
        "config", "set", "--device", device.uuid, "wifi=open again", "--reason", "test",
        "--database", env.db_url,
    )  # fmt: skip
    late = await env.call("GET", "/config", device=await env.renewed(device, key=new_key))
    assert late.status == 403 and "announced" in late.text, late.text
    async with env.store.transaction() as session:
        trail = [entry.action for entry in await audit.list_audit(session, target=device.uuid)]
    assert "device.next-key-withdrawn" in trail


# -- update events and applied config ----------------------------------------------------------


def event(event_id: str, step: str, rotation: str, success: bool | None = None) -> dict:
    return {
        "id": event_id,
        "deviceTime": "2026-11-23T10:00:00Z",
        "event": {
            "correlationId": rotation,
            "success": success,
            "targetName": "lmp-123",
            "version": "123",
            "details": "",
        },
        "eventType": {"id": step, "version": 0},
    }


async def test_update_events_are_kept_in_order_and_resends_ignored(env):
    device = await env.device()
    rotation = "certs-1790000000"
    steps = [
        event(str(uuid.uuid4()), "CertRotationStarted", rotation),
        event(str(uuid.uuid4()), "Generate new certificate", rotation, True),
        event(str(uuid.uuid4()), "Lock device configuration on server", rotation, True),
    ]
    reply = await env.call("POST", "/events", device=device, json_body=steps)
    assert reply.status == 200, reply.text
    assert json.loads(reply.body) == {"device": device.uuid, "stored": 3, "duplicates": 0}

    failed = event(str(uuid.uuid4()), "CertRotationCompleted", rotation, False)
    reply = await env.call("POST", "/events", device=device, json_body=[*steps[1:], failed])
    assert json.loads(reply.body) == {"device": device.uuid, "stored": 1, "duplicates": 2}

    async with env.store.transaction() as session:
        update = await updates.get_update(session, device.uuid, rotation)
        stored = await updates.list_update_events(session, update.id)
    assert update.status == UpdateStatus.FAILED and update.kind == "cert-rotation"
    assert [e.event_type for e in stored] == [
        "CertRotationStarted",
        "Generate new certificate",
        "Lock device configuration on server",
        "CertRotationCompleted",
    ]
    assert stored[-1].success is False and stored[1].target_name == "lmp-123"
    assert len(await env.events(names.ROTATION_STEP, device.uuid)) == 4

    other = await env.device()
    reply = await env.call("POST", "/events", device=other, json_body=steps[:1])
    assert json.loads(reply.body)["stored"] == 1, "the same ids are new for another device"


async def test_applied_config_is_reported_as_an_event(env):
    device = await env.device()
    await env.set_group(device.uuid, "lab")
    version = "Mon, 23 Nov 2026 10:00:00 GMT"
    reply = await env.call("POST", "/config/applied", device=device, json_body={"version": version})
    assert reply.status == 200, reply.text
    applied = await env.events(names.DEVICE_CONFIG_APPLIED, device.uuid)
    assert len(applied) == 1
    assert {k: applied[0].payload[k] for k in ("uuid", "group", "version")} == {
        "uuid": device.uuid,
        "group": "lab",
        "version": version,
    }


async def test_devices_deny_refuses_a_device_at_once(env):
    device = await env.device()
    assert (await env.call("GET", "/device", device=device)).status == 200
    out = (
        await cli("devices", "deny", device.uuid, "--reason", "stolen", "--database", env.db_url)
    ).stdout
    assert f"denied: certificate serial {device.cert.serial_number:x}" in out
    again = (
        await cli(
            "devices",
            "deny",
            "--sha256",
            cert_sha256(device.cert),
            "--reason",
            "x",
            "--database",
            env.db_url,
        )  # fmt: skip
    ).stdout
    assert "already denied (stolen)" in again
    for _ in range(20):
        reply = await env.call("GET", "/device", device=device)
        if reply.status == 403:
            break
        await asyncio.sleep(0.1)
    assert reply.status == 403 and "deny-list" in reply.text
    assert len(await env.events(names.DENYLIST_ADDED, device.uuid)) == 1


# -- races -----------------------------------------------------------------------------------


async def test_parallel_first_requests_register_the_device_once(env):
    device = await env.offline_device()
    replies = await asyncio.gather(*(env.call("GET", "/device", device=device) for _ in range(6)))
    assert [r.status for r in replies] == [200] * 6, [r.text for r in replies]
    assert len(await env.events(names.DEVICE_REGISTERED, device.uuid)) == 1


async def test_parallel_first_requests_with_the_new_key_change_it_once(env):
    device = await env.device()
    new_key = generate_private_key()
    body = {"next_pubkey": pem_of(new_key)}
    assert (await env.call("PATCH", "/device", device=device, json_body=body)).status == 200
    renewed = await env.renewed(device, key=new_key)
    replies = await asyncio.gather(*(env.call("GET", "/config", device=renewed) for _ in range(6)))
    assert [r.status for r in replies] == [200] * 6, [r.text for r in replies]
    assert len(await env.events(names.DEVICE_PUBKEY_CHANGE, device.uuid)) == 1
    async with env.store.transaction() as session:
        assert len(await denylist.list_denied(session, device_uuid=device.uuid)) == 1


async def test_a_date_from_a_clock_ahead_does_not_hide_changes(env):
    device = await env.device()
    await set_files(env, ConfigScope.FACTORY, "", motd="one")
    future = "Tue, 01 Jan 2036 00:00:00 GMT"
    reply = await env.call("GET", "/config", device=device, headers={"If-Modified-Since": future})
    assert reply.status == 200


def test_operator_commands_refuse_what_they_cannot_do(tmp_path):
    database = f"sqlite:///{tmp_path / 'empty.db'}"
    unknown = str(uuid.uuid4())
    done = certfleet_blocking(
        "config", "set", "--device", unknown, "a=b", "--reason", "r", "--database", database,
        expect=2,
    )  # fmt: skip
    assert f"no device {unknown}" in done.stderr
    done = certfleet_blocking(
        "config", "set", "--factory-wide", "../x=b", "--reason", "r", "--database", database,
        expect=2,
    )  # fmt: skip
    assert "config file name '../x' is not allowed" in done.stderr
    done = certfleet_blocking(
        "devices", "deny", "--serial", "abcd", "--reason", "r", "--database", database, expect=2
    )
    assert "no certificate with serial abcd is known; deny it by --sha256 instead" in done.stderr
    done = certfleet_blocking("devices", "deny", "--reason", "r", "--database", database, expect=2)
    assert "give exactly one of UUID, --serial S or --sha256 F" in done.stderr
