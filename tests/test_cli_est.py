"""`certfleet est ...` end to end: real processes, the real store, the EST server on loopback."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import uuid

import pytest
from sqlalchemy import select

from certfleet.pki.keys import generate_private_key
from certfleet.store import audit, devices
from certfleet.store.schema import EstCredential

from .cli_run import certfleet
from .est_fixtures import EstEnv, make_csr, running_env


@pytest.fixture
async def env(db_url, tmp_path):
    async with running_env(db_url, tmp_path) as running:
        yield running


async def est_cli(env: EstEnv, *args: str, expect: int = 0):
    """Run `certfleet est ARGS` against the env's store without blocking its server."""
    return await asyncio.to_thread(
        certfleet,
        "est",
        *args,
        "--pki",
        str(env.pki["acme"]),
        "--database",
        env.db_url,
        expect=expect,
    )


async def _create(env: EstEnv, device_uuid: str, *extra: str) -> tuple[str, str, str]:
    done = await est_cli(
        env, "credentials", "create", "--device", device_uuid, "--factory", "acme", *extra
    )
    username = re.search(r"^username: (\S+)$", done.stdout, re.M).group(1)
    password = re.search(r"^password: (\S+)$", done.stdout, re.M).group(1)
    return username, password, done.stdout


async def test_credential_password_is_shown_once_and_stored_hashed(env):
    device_uuid = str(uuid.uuid4())
    username, password, out = await _create(env, device_uuid)
    assert out.count(password) == 1
    assert "shown only now" in out
    listed = await est_cli(env, "credentials", "list", "--json")
    assert password not in listed.stdout
    [entry] = json.loads(listed.stdout)
    assert entry["username"] == username and entry["device"] == device_uuid
    assert entry["state"] == "unused" and entry["factory"] == "acme"
    table = await est_cli(env, "credentials", "list")
    assert username in table.stdout and password not in table.stdout
    async with env.store.transaction() as session:
        rows = list(await session.scalars(select(EstCredential)))
        entries = await audit.list_audit(session, target=device_uuid)
    [row] = rows
    assert row.secret_hash.startswith("scrypt$") and password not in row.secret_hash
    assert all(password not in str(value) for value in vars(row).values())
    assert [e.action for e in entries] == ["est.credential.create"]
    assert password not in json.dumps(entries[0].details)
    if env.db_url.startswith("sqlite"):
        database = env.db_url.removeprefix("sqlite:///")
        for suffix in ("", "-wal"):
            try:
                data = open(database + suffix, "rb").read()
            except FileNotFoundError:
                continue
            assert password.encode() not in data


async def test_the_printed_credential_enrolls_once(env):
    device_uuid = str(uuid.uuid4())
    username, password, _ = await _create(env, device_uuid, "--expires-in", "90m")
    [entry] = json.loads((await est_cli(env, "credentials", "list", "--json")).stdout)
    expires = dt.datetime.fromisoformat(entry["expires_at"])
    assert abs(expires - dt.datetime.now(dt.UTC) - dt.timedelta(minutes=90)) < dt.timedelta(
        minutes=1
    )
    csr = make_csr(generate_private_key(), cn=device_uuid)
    reply = await env.post_csr("simpleenroll", csr, auth=(username, password))
    assert reply.status == 200, reply.text
    [entry] = json.loads((await est_cli(env, "credentials", "list", "--json")).stdout)
    assert entry["state"] == "used" and entry["used_at"]


async def test_json_create_for_scripts(env):
    device_uuid = str(uuid.uuid4()).upper()
    done = await est_cli(
        env, "credentials", "create", "--device", device_uuid, "--factory", "globex", "--json"
    )
    created = json.loads(done.stdout)
    assert created["device"] == device_uuid.lower()
    assert created["factory"] == "globex" and created["password"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "not-a-uuid", "--factory", "acme"], "'not-a-uuid' is not a device uuid"),
        (["--device", str(uuid.uuid4())], "several factories (acme, globex): pass --factory"),
        (["--device", str(uuid.uuid4()), "--factory", "nope"], "no factory named 'nope'"),
    ],
)
async def test_create_refusals_are_one_line(env, args, message):
    done = await est_cli(env, "credentials", "create", *args, expect=2)
    assert message in done.stderr
    assert done.stderr.count("\n") == 1
    assert json.loads((await est_cli(env, "credentials", "list", "--json")).stdout) == []


async def test_bad_duration_is_a_usage_error(env):
    done = await est_cli(
        env,
        "credentials",
        "create",
        "--device",
        str(uuid.uuid4()),
        "--factory",
        "acme",
        "--expires-in",
        "7x",
        expect=2,
    )
    assert "not a positive duration like 30m, 12h, 7d or 2w" in done.stderr


async def test_credential_for_a_deleted_device_is_refused(env):
    device = await env.device()
    async with env.store.transaction() as session:
        await devices.soft_delete_device(session, device.uuid)
    done = await est_cli(
        env, "credentials", "create", "--device", device.uuid, "--factory", "acme", expect=2
    )
    assert "was deleted" in done.stderr


async def test_pending_list_approve_reject(env):
    await env.serve(manual_approval=True)
    first, second = await env.device(), await env.device()
    for device in (first, second):
        held = await env.post_csr("simplereenroll", device.csr(), device=device)
        assert held.status == 202
    listed = json.loads((await est_cli(env, "pending", "list", "--json")).stdout)
    assert [p["device"] for p in listed] == [first.uuid, second.uuid]
    assert all(p["status"] == "pending" and not p["issued"] for p in listed)
    table = await est_cli(env, "pending", "list")
    assert first.uuid in table.stdout

    done = await est_cli(env, "pending", "approve", str(listed[0]["id"]))
    assert f"request {listed[0]['id']}" in done.stdout and "approved" in done.stdout
    done = await est_cli(env, "pending", "reject", str(listed[1]["id"]))
    assert "rejected" in done.stdout
    again = await est_cli(env, "pending", "approve", str(listed[1]["id"]), expect=2)
    assert f"EST request {listed[1]['id']} was already rejected" in again.stderr
    missing = await est_cli(env, "pending", "reject", "999", expect=2)
    assert "no EST request 999" in missing.stderr

    only = json.loads(
        (await est_cli(env, "pending", "list", "--status", "approved", "--json")).stdout
    )
    assert [p["id"] for p in only] == [listed[0]["id"]]
    async with env.store.transaction() as session:
        entries = await audit.list_audit(session, actor="cli")
    actions = {e.action for e in entries}
    assert {"est.pending.approve", "est.pending.reject"} <= actions
