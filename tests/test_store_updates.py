"""Device updates and their step events; resent events are ignored."""

from datetime import UTC, datetime

import pytest

from certfleet.store import NotFoundError
from certfleet.store.devices import add_device
from certfleet.store.factories import add_factory
from certfleet.store.schema import UpdateStatus
from certfleet.store.updates import (
    add_update_event,
    get_update,
    list_update_events,
    list_updates,
    set_update_status,
    start_update,
)

ROTATION = "certs-1767225600"
STEPS = [
    "CertRotationStarted",
    "Generate new certificate",
    "Lock device configuration on server",
]


@pytest.fixture
async def devices(store):
    async with store.transaction() as tx:
        factory = await add_factory(tx, "acme")
        for uuid in ("d-1", "d-2"):
            await add_device(tx, uuid, factory_id=factory.id, registered_via="online")


async def report(tx, update_id, n, step):
    return await add_update_event(
        tx,
        update_id,
        event_id=f"ev-{n}",
        event_type=step,
        device_time=datetime(2026, 1, 1, 0, 0, n, tzinfo=UTC),
        success=True,
        target_name="intel-corei7-64-lmp-42",
        version="42",
    )


async def test_resent_event_is_ignored_and_order_kept(store, devices):
    async with store.transaction() as tx:
        update = await start_update(tx, "d-1", ROTATION, kind="rotation")
        assert [await report(tx, update.id, n, s) for n, s in enumerate(STEPS)] == [True] * 3
    async with store.transaction() as tx:
        assert await report(tx, update.id, 1, STEPS[1]) is False
    async with store.transaction() as tx:
        events = await list_update_events(tx, update.id)
    assert [e.event_type for e in events] == STEPS
    assert events[0].device_time == datetime(2026, 1, 1, tzinfo=UTC)


async def test_devices_share_a_correlation_id(store, devices):
    async with store.transaction() as tx:
        one = await start_update(tx, "d-1", ROTATION, kind="rotation")
        two = await start_update(tx, "d-2", ROTATION, kind="rotation")
        again = await start_update(tx, "d-1", ROTATION, kind="rotation")
        assert one.id != two.id
        assert again.id == one.id
        assert await report(tx, one.id, 0, STEPS[0])
        assert await report(tx, two.id, 0, STEPS[0])


async def test_status_and_listing(store, devices):
    async with store.transaction() as tx:
        first = await start_update(tx, "d-1", "ota-1", kind="ota")
        await start_update(tx, "d-1", ROTATION, kind="rotation")
        await set_update_status(tx, first.id, UpdateStatus.FAILED)
    async with store.transaction() as tx:
        assert (await get_update(tx, "d-1", "ota-1")).status == "failed"
        assert [u.correlation_id for u in await list_updates(tx, "d-1")] == [ROTATION, "ota-1"]
        with pytest.raises(NotFoundError, match="device d-2 has no update ota-1"):
            await get_update(tx, "d-2", "ota-1")
