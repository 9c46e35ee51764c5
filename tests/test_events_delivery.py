"""Event delivery to a real webhook receiver on loopback, on SQLite and PostgreSQL.

The receiver checks every signature, can fail requests or go down, and logs
what arrives, so each test can check at-least-once delivery and the order of
every device's events as the receiver saw them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections import Counter
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

import pytest
from aiohttp import web

from certfleet.events import names
from certfleet.events.backoff import Backoff
from certfleet.events.delivery import DeliveryLoop
from certfleet.events.webhook import (
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    TOPIC_HEADER,
    WebhookSink,
    sign,
    verify_signature,
)
from certfleet.store import open_store, outbox
from certfleet.store.schema import utcnow

SECRET = "receiver-secret-0123456789"
FAST = Backoff(base=0.02, cap=0.2)
DEADLINE = 30.0


class Receiver:
    """A webhook endpoint on 127.0.0.1 that verifies signatures and logs arrivals."""

    def __init__(self, secret: str = SECRET, delay: float = 0.0) -> None:
        self.secret = secret
        self.delay = delay
        self.port = 0
        self.fail_next = 0
        self.fail_devices: set[str] = set()
        self.accepted: list[dict] = []
        # (event id, device, how many were accepted when it arrived, answer)
        self.arrivals: list[list] = []
        self.bad_signatures = 0
        self.in_flight: set[str] = set()
        self.overlaps: list[str] = []
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not verify_signature(self.secret, body, request.headers.get(SIGNATURE_HEADER)):
            self.bad_signatures += 1
            return web.Response(status=401)
        envelope = json.loads(body)
        assert request.headers[EVENT_ID_HEADER] == envelope["id"]
        assert request.headers[TOPIC_HEADER] == envelope["topic"]
        arrival = [envelope["id"], envelope["device"], len(self.accepted), None]
        self.arrivals.append(arrival)
        arrival[3] = await self._answer(envelope)
        if arrival[3] == 204:
            self.accepted.append(envelope)
        return web.Response(status=arrival[3])

    async def _answer(self, envelope: dict) -> int:
        if envelope["id"] in self.in_flight:
            self.overlaps.append(envelope["id"])
        self.in_flight.add(envelope["id"])
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight.discard(envelope["id"])
        if self.fail_next > 0:
            self.fail_next -= 1
            return 500
        return 500 if envelope["device"] in self.fail_devices else 204

    def accepted_ids(self, device: str | None = None) -> list[str]:
        return [e["id"] for e in self.accepted if device is None or e["device"] == device]

    def requested_ids(self, device: str) -> list[str]:
        return [a[0] for a in self.arrivals if a[1] == device]


def out_of_order(receiver: Receiver, expected: dict[str, list[str]]) -> list[str]:
    """Events that arrived before every earlier event of their device had been accepted."""
    bad = []
    for event_id, device, seen, _ in receiver.arrivals:
        done = {e["id"] for e in receiver.accepted[:seen]}
        chain = expected[device]
        if not set(chain[: chain.index(event_id)]) <= done:
            bad.append(event_id)
    return bad


@pytest.fixture
async def receiver():
    running = Receiver()
    await running.start()
    yield running
    await running.stop()


async def add_events(store, devices: list[str], per_device: int) -> dict[str, list[str]]:
    """Interleaved events for each device; returns each device's event ids in order."""
    expected: dict[str, list[str]] = {d: [] for d in devices}
    async with store.transaction() as tx:
        for n in range(per_device):
            for device in devices:
                data = {"device": device, "n": n}
                row = await outbox.append_event(tx, names.ROTATION_STEP, data, device_uuid=device)
                expected[device].append(str(row.id))
    return expected


async def stored(store) -> list:
    async with store.transaction() as tx:
        return await outbox.latest_events(tx, limit=100_000)


async def all_delivered(store) -> bool:
    return all(row.delivered_at is not None for row in await stored(store))


async def eventually(check, timeout: float = DEADLINE) -> None:
    """Wait until the (sync or async) ``check`` is true."""
    async with asyncio.timeout(timeout):
        while True:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.02)


@asynccontextmanager
async def running(loop: DeliveryLoop):
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    try:
        yield loop
    finally:
        stop.set()
        await asyncio.wait_for(task, DEADLINE)


def webhook_loop(store, *hooks: Receiver, secret: str = SECRET, **options) -> DeliveryLoop:
    sinks = [WebhookSink(hook.url, secret, timeout=5) for hook in hooks]
    options = {"poll_interval": 0.02, "backoff": FAST, **options}
    return DeliveryLoop(store, sinks, **options)


def test_signature_is_hmac_sha256_of_the_raw_body():
    body = b'{"id":"1"}'
    header = sign(SECRET, body)
    assert header.startswith("sha256=") and len(header) == len("sha256=") + 64
    assert verify_signature(SECRET, body, header)
    assert verify_signature(SECRET.encode(), body, header)
    assert not verify_signature("another-secret-0123456789", body, header)
    assert not verify_signature(SECRET, body + b" ", header)
    for broken in (None, "", header[7:], "sha1=" + header[7:], header[:-1]):
        assert not verify_signature(SECRET, body, broken)


def test_backoff_grows_exponentially_with_full_jitter_up_to_the_cap():
    backoff = Backoff()
    for failures, ceiling in ((0, 1), (1, 2), (3, 8), (9, 512), (10, 600), (5000, 600)):
        delays = [backoff.delay(failures) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 2  # jitter spans the range, not a fixed value


def test_a_loop_without_sinks_is_refused():
    # Otherwise every event would be marked delivered without going anywhere.
    with pytest.raises(ValueError, match="at least one sink"):
        DeliveryLoop(store=None, sinks=[])


async def test_events_arrive_signed_as_envelopes_in_order(store, receiver):
    expected = await add_events(store, ["dev-a", "dev-b", "dev-c"], 4)
    async with store.transaction() as tx:
        loose = await outbox.append_event(tx, names.CA_REVOKED, {"ca": "local-ca-1"})
    loop = webhook_loop(store, receiver)
    assert await loop.run_once() == 13
    assert await loop.run_once() == 0
    await loop.close()

    assert receiver.bad_signatures == 0
    for device, ids in expected.items():
        assert receiver.accepted_ids(device) == ids
    first = receiver.accepted[0]
    assert set(first) == {"id", "topic", "device", "time", "data"}
    assert first["topic"] == names.ROTATION_STEP and first["data"] == {"device": "dev-a", "n": 0}
    assert first["time"].endswith("Z")
    assert abs(datetime.fromisoformat(first["time"]) - utcnow()) < timedelta(minutes=1)
    [alone] = [e for e in receiver.accepted if e["device"] is None]
    assert alone["id"] == str(loose.id) and alone["data"] == {"ca": "local-ca-1"}
    assert await all_delivered(store)


async def test_failed_posts_are_retried_with_backoff_then_delivered_in_order(store, receiver):
    expected = await add_events(store, ["dev-a"], 5)
    head = int(expected["dev-a"][0])
    receiver.fail_next = 3
    loop = webhook_loop(store, receiver, backoff=Backoff(base=0.5, cap=0.5))

    assert await loop.run_once() == 0
    failure = loop.failures[head]
    assert failure.attempts == 1 and failure.error == f"webhook {receiver.url}: HTTP 500"
    assert failure.retry_at <= utcnow() + timedelta(seconds=0.5)
    while utcnow() < failure.retry_at - timedelta(seconds=0.05):
        await loop.run_once()  # not due yet: nothing may be sent
        await asyncio.sleep(0.01)
    assert receiver.requested_ids("dev-a") == [str(head)]

    async with running(loop):
        await eventually(lambda: all_delivered(store))
    rows = {row.id: row for row in await stored(store)}
    assert rows[head].attempts == 3
    assert all(rows[int(i)].attempts == 0 for i in expected["dev-a"][1:])
    assert receiver.accepted_ids("dev-a") == expected["dev-a"]
    assert receiver.requested_ids("dev-a") == [str(head)] * 4 + expected["dev-a"][1:]
    assert out_of_order(receiver, expected) == []
    assert loop.failures == {}


async def test_a_failing_device_does_not_hold_up_the_others(store, receiver):
    expected = await add_events(store, ["dev-a", "dev-b", "dev-c"], 5)
    receiver.fail_devices = {"dev-b"}
    loop = webhook_loop(store, receiver, batch=7)
    async with running(loop):
        await eventually(
            lambda: len(receiver.accepted_ids("dev-a") + receiver.accepted_ids("dev-c")) == 10
        )
        await eventually(lambda: loop.failures.get(int(expected["dev-b"][0])))
        assert receiver.accepted_ids("dev-b") == []
        assert set(receiver.requested_ids("dev-b")) == {expected["dev-b"][0]}
        receiver.fail_devices.clear()
        await eventually(lambda: all_delivered(store))
    for device, ids in expected.items():
        assert receiver.accepted_ids(device) == ids
    assert out_of_order(receiver, expected) == []


async def test_a_receiver_that_is_down_gets_everything_once_it_is_back(store, receiver):
    expected = await add_events(store, ["dev-a", "dev-b"], 3)
    await receiver.stop()
    loop = webhook_loop(store, receiver)
    async with running(loop):
        await eventually(lambda: len(loop.failures) == 2)
        assert all("cannot connect" in f.error for f in loop.failures.values())
        assert not await all_delivered(store)
        await receiver.start()
        await eventually(lambda: all_delivered(store))
    for device, ids in expected.items():
        assert receiver.accepted_ids(device) == ids
    assert out_of_order(receiver, expected) == []


async def test_an_event_is_done_only_when_every_webhook_took_it(store, receiver):
    other = Receiver()
    await other.start()
    try:
        expected = await add_events(store, ["dev-a"], 2)
        other.fail_next = 2
        loop = webhook_loop(store, receiver, other)
        assert await loop.run_once() == 0
        assert receiver.accepted_ids() == expected["dev-a"][:1]
        assert not any(row.delivered_at for row in await stored(store))
        async with running(loop):
            await eventually(lambda: all_delivered(store))
        # The receiver that took the first event is not sent it again.
        assert receiver.accepted_ids() == expected["dev-a"]
        assert other.accepted_ids() == expected["dev-a"]
    finally:
        await other.stop()


async def test_a_wrong_secret_is_refused_and_the_event_kept(store, receiver):
    await add_events(store, ["dev-a"], 1)
    loop = webhook_loop(store, receiver, secret="not-the-receiver-secret")
    assert await loop.run_once() == 0
    await loop.close()
    assert receiver.bad_signatures == 1 and receiver.accepted == []
    [row] = await stored(store)
    assert row.delivered_at is None and row.attempts == 1
    assert loop.failures[row.id].error.endswith("HTTP 401")


LOOP_SCRIPT = """
import asyncio, sys
from certfleet.events.backoff import Backoff
from certfleet.events.delivery import DeliveryLoop
from certfleet.events.webhook import WebhookSink
from certfleet.store import open_store

async def main(url, hook, secret):
    store = await open_store(url)
    sink = WebhookSink(hook, secret, timeout=5)
    loop = DeliveryLoop(store, [sink], poll_interval=0.02, batch=50, backoff=Backoff(base=0.02))
    await loop.run(asyncio.Event())

asyncio.run(main(*sys.argv[1:]))
"""


async def start_loop_process(db_url: str, hook: Receiver, log_path):
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        LOOP_SCRIPT,
        db_url,
        hook.url,
        SECRET,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=log_path.open("ab"),
    )


async def test_a_killed_loop_loses_nothing_and_keeps_device_order(store, db_url, tmp_path):
    hook = Receiver(delay=0.02)
    await hook.start()
    expected = await add_events(store, [f"dev-{n}" for n in range(8)], 25)
    log_path = tmp_path / "loop.log"
    try:
        first = await start_loop_process(db_url, hook, log_path)
        await eventually(lambda: len(hook.accepted) >= 30)
        os.kill(first.pid, signal.SIGKILL)  # inside the first batch of 50
        await first.wait()
        before_restart = len(hook.accepted)
        second = await start_loop_process(db_url, hook, log_path)
        try:
            await eventually(lambda: all_delivered(store), timeout=60)
        finally:
            second.kill()
            await second.wait()
    finally:
        await hook.stop()

    everything = [i for ids in expected.values() for i in ids]
    assert before_restart < len(everything)
    assert set(hook.accepted_ids()) == set(everything), log_path.read_text()
    assert len(hook.accepted) > len(everything)  # the unrecorded part of the batch came again
    assert out_of_order(hook, expected) == []
    for device, ids in expected.items():
        assert list(dict.fromkeys(hook.accepted_ids(device))) == ids


async def test_two_loops_never_send_one_event_at_the_same_time(store, db_url):
    if store.engine.dialect.name != "postgresql":
        pytest.skip("SQLite runs one delivery loop per database (see certfleet.events.delivery)")
    hook = Receiver(delay=0.005)
    await hook.start()
    expected = await add_events(store, [f"dev-{n}" for n in range(30)], 10)
    other_store = await open_store(db_url)
    loops = [webhook_loop(s, hook, batch=20) for s in (store, other_store)]
    try:
        async with running(loops[0]), running(loops[1]):
            await eventually(lambda: all_delivered(store), timeout=60)
    finally:
        await other_store.close()
        await hook.stop()
    assert hook.overlaps == []
    assert all(n == 1 for n in Counter(hook.accepted_ids()).values())
    assert len(hook.accepted) == 300
    assert out_of_order(hook, expected) == []
    assert all(loop.delivered_count > 0 for loop in loops)
