"""Publishing events to the real NATS JetStream server on 127.0.0.1:4222.

Skipped when no server answers, unless CERTFLEET_REQUIRE_NATS=1. Each test
uses its own stream and subject prefix and deletes the stream afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket

import pytest
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from certfleet.events import names
from certfleet.events.delivery import DeliveryLoop
from certfleet.events.names import Envelope
from certfleet.events.nats import NatsSink
from certfleet.store import outbox

NATS_URL = os.environ.get("CERTFLEET_TEST_NATS_URL", "nats://127.0.0.1:4222")


async def _connect() -> Client:
    client = Client()
    try:
        async with asyncio.timeout(3):
            await client.connect(NATS_URL, connect_timeout=2, max_reconnect_attempts=-1)
    except BaseException:
        await client.close()
        raise
    return client


@pytest.fixture
async def jetstream():
    try:
        client = await _connect()
    except Exception as exc:
        reason = f"no NATS server at {NATS_URL} ({type(exc).__name__})"
        if os.environ.get("CERTFLEET_REQUIRE_NATS") == "1":
            pytest.fail(f"CERTFLEET_REQUIRE_NATS=1 but {reason}")
        pytest.skip(f"{reason}; set CERTFLEET_TEST_NATS_URL")
    yield client.jetstream()
    await client.close()


@pytest.fixture
async def stream(jetstream):
    """A fresh (stream name, subject prefix) pair; the stream is deleted afterwards."""
    tag = secrets.token_hex(4)
    name = f"CFTEST_{tag}"
    yield name, f"cftest{tag}"
    try:
        await jetstream.delete_stream(name)
    except NotFoundError:
        pass


async def test_events_are_published_once_per_id(store, jetstream, stream):
    name, prefix = stream
    async with store.transaction() as tx:
        rows = [
            await outbox.append_event(tx, names.DEVICE_REGISTERED, {"n": 0}, device_uuid="dev-a"),
            await outbox.append_event(tx, names.CERT_ISSUED, {"n": 1}, device_uuid="dev-a"),
            await outbox.append_event(tx, names.CA_REVOKED, {"n": 2}),
        ]
    sink = NatsSink(NATS_URL, subject_prefix=prefix, stream=name)
    loop = DeliveryLoop(store, [sink])
    assert await loop.run_once() == 3

    info = await jetstream.stream_info(name)
    assert info.config.subjects == [f"{prefix}.>"] and info.config.duplicate_window == 3600
    # A redelivery (e.g. after a crash before the outbox was marked) is dropped.
    await sink.send(Envelope.of(rows[0]))
    await loop.close()
    assert (await jetstream.stream_info(name)).state.messages == 3

    consumer = await jetstream.pull_subscribe(f"{prefix}.>", stream=name)
    messages = await consumer.fetch(3, timeout=5)
    by_id = {message.headers["Nats-Msg-Id"]: message for message in messages}
    assert sorted(by_id) == sorted(str(row.id) for row in rows)
    for row in rows:
        message = by_id[str(row.id)]
        assert message.subject == f"{prefix}.{row.topic}"
        assert json.loads(message.data) == Envelope.of(row).to_dict()
        await message.ack()
    # Devices are sent side by side; one device's events stay in order.
    device_a = [m.headers["Nats-Msg-Id"] for m in messages if m.subject != f"{prefix}.CA_REVOKED"]
    assert device_a == [str(rows[0].id), str(rows[1].id)]
    await consumer.unsubscribe()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_an_unreachable_server_fails_the_event_for_a_retry(store):
    async with store.transaction() as tx:
        row = await outbox.append_event(tx, names.DEVICE_REGISTERED, {}, device_uuid="dev-a")
    sink = NatsSink(f"nats://127.0.0.1:{_closed_port()}", stream="CFTEST_NONE", timeout=0.5)
    loop = DeliveryLoop(store, [sink])
    assert await loop.run_once() == 0
    await loop.close()
    assert loop.failures[row.id].error.startswith("nats nats://127.0.0.1:")
    async with store.transaction() as tx:
        [stored] = await outbox.latest_events(tx)
    assert stored.attempts == 1 and stored.delivered_at is None
