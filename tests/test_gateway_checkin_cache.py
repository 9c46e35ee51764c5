"""Config check-ins answered from each worker's memory, and what makes a worker read again.

A 304 comes from the worker's cache; a change another process makes to what
the answer depends on (config, group, deletion, CA status) moves the store's
change counter, which the worker polls with the deny-list, so the change is
seen within about a second.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from certfleet.fleet import config_admin
from certfleet.store import cas, devices
from certfleet.store.schema import CaStatus, ConfigScope

from .gateway_fixtures import running_gateway
from .test_gateway_e2e import decrypt, set_files, settled_last_modified


@pytest.fixture
async def env(db_url, tmp_path):
    async with running_gateway(db_url, tmp_path) as running:
        yield running


async def check_in(env, device, since: str):
    return await env.call("GET", "/config", device=device, headers={"If-Modified-Since": since})


async def first_other_than_304(env, device, since: str, seconds: float = 1.0):
    """(reply, seconds it took) of the first check-in answered with anything but 304."""
    start = time.monotonic()
    while True:
        reply = await check_in(env, device, since)
        took = time.monotonic() - start
        if reply.status != 304 or took > seconds + 1:
            return reply, took
        await asyncio.sleep(0.05)


async def test_a_304_comes_from_memory_until_the_poll_sees_a_change(env):
    device = await env.device()
    await set_files(env, ConfigScope.FACTORY, "", motd="one")
    await asyncio.sleep(1.1)  # the change's second is over: its version is settled
    since = await settled_last_modified(env, device)
    await asyncio.sleep(0.5)  # the worker has polled since
    await env.service.denied.stop()  # polled by hand from here on
    await set_files(env, ConfigScope.FACTORY, "", motd="two")
    await asyncio.sleep(1.1)  # the store would now answer 200 (see config.version)

    reply = await check_in(env, device, since)
    assert reply.status == 304, "answered from memory: the store was not asked"
    await env.service.denied.poll()
    reply = await check_in(env, device, since)
    assert reply.status == 200
    assert decrypt(device, json.loads(reply.body)["motd"]["Value"]) == "two"


async def test_a_deletion_elsewhere_is_refused_within_a_second(env):
    device = await env.device()
    await set_files(env, ConfigScope.FACTORY, "", motd="one")
    since = await settled_last_modified(env, device)
    async with env.store.transaction() as tx:
        await devices.soft_delete_device(tx, device.uuid)
    reply, took = await first_other_than_304(env, device, since)
    assert reply.status == 403 and reply.headers["X-Certfleet-Error"] == "device-deleted"
    assert took <= 1.0


async def test_a_revoked_device_ca_is_refused_within_a_second(env):
    device = await env.device()
    await set_files(env, ConfigScope.FACTORY, "", motd="one")
    since = await settled_last_modified(env, device)
    factory_id = await env.factory_id("acme")
    async with env.store.transaction() as tx:
        ca = await cas.get_ca_by_name(tx, factory_id, "online-ca")
        await cas.set_ca_status(tx, ca.id, CaStatus.REVOKED)
    reply, took = await first_other_than_304(env, device, since)
    assert reply.status == 403 and reply.headers["X-Certfleet-Error"] == "ca-revoked"
    assert took <= 1.0


async def test_a_device_moved_to_another_group_gets_that_groups_files(env):
    device = await env.device()
    await set_files(env, ConfigScope.GROUP, "west", wifi="west-psk")
    await asyncio.sleep(1.1)
    await set_files(env, ConfigScope.FACTORY, "", motd="hi")
    await asyncio.sleep(1.1)  # the change's second is over: its version is settled
    since = await settled_last_modified(env, device)

    # The group's files are older than what the device has: only the move is new.
    moved = await env.fleet(
        config_admin.move_to_group, device.uuid, "west", reason="relocated", actor="test"
    )
    assert moved is not None
    await asyncio.sleep(1.1)  # past the move's second (config.version), and polled
    reply = await check_in(env, device, since)
    assert reply.status == 200
    assert decrypt(device, json.loads(reply.body)["wifi"]["Value"]) == "west-psk"


async def test_last_seen_is_written_within_a_second_of_a_check_in(env):
    device = await env.device()
    assert (await env.device_row(device.uuid)).last_seen_at is None
    reply = await env.call("GET", "/config", device=device)
    assert reply.status == 200
    for _ in range(30):
        if (await env.device_row(device.uuid)).last_seen_at is not None:
            break
        await asyncio.sleep(0.1)
    assert (await env.device_row(device.uuid)).last_seen_at is not None
