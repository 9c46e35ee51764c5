"""The event outbox: order, delivery marks and retries."""

from datetime import UTC, datetime, timedelta

from certfleet.store.outbox import append_event, fetch_undelivered, mark_delivered, mark_failed


async def test_undelivered_events_come_in_insertion_order(store):
    async with store.transaction() as tx:
        for n in range(5):
            await append_event(tx, "DEVICE_PUBKEY_CHANGE", {"n": n}, device_uuid=f"d-{n}")
    async with store.transaction() as tx:
        events = await fetch_undelivered(tx, limit=3)
        assert [e.payload["n"] for e in events] == [0, 1, 2]
        await mark_delivered(tx, [e.id for e in events[:2]])
    async with store.transaction() as tx:
        assert [e.payload["n"] for e in await fetch_undelivered(tx)] == [2, 3, 4]


async def test_failed_event_waits_for_its_retry_time(store):
    async with store.transaction() as tx:
        first = await append_event(tx, "DEVICE_CONFIG_APPLIED", {"n": 0})
        await append_event(tx, "DEVICE_CONFIG_APPLIED", {"n": 1})
    later = datetime.now(UTC) + timedelta(minutes=5)
    async with store.transaction() as tx:
        await mark_failed(tx, first.id, retry_at=later)
    async with store.transaction() as tx:
        assert [e.payload["n"] for e in await fetch_undelivered(tx)] == [1]
        due = await fetch_undelivered(tx, now=later)
    assert [e.payload["n"] for e in due] == [0, 1]
    assert due[0].attempts == 1


async def test_payload_round_trips_as_json(store):
    payload = {"uuid": "d-1", "group": None, "pubkeys": ["a", "b"], "nested": {"ok": True}}
    async with store.transaction() as tx:
        await append_event(tx, "DEVICE_PUBKEY_CHANGE", payload)
    async with store.transaction() as tx:
        assert (await fetch_undelivered(tx))[0].payload == payload
