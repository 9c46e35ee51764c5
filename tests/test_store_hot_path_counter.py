"""The change counter: what moves it (per-device state servers cache) and what does not.

The triggers live in the database (migration 0002), so a write from any
process moves it; these tests write through the ORM, as operator commands do.
"""

from __future__ import annotations

import datetime as dt
import secrets

from sqlalchemy import select, update

from certfleet.fleet import config_admin
from certfleet.store import cas, devices
from certfleet.store.config_files import ConfigValue, config_history, put_config_files
from certfleet.store.schema import CaStatus, ChangeCounter, ConfigScope, Device

from .test_store_hot_path import setup_device


async def generation(store) -> int:
    async with store.transaction() as tx:
        return await tx.scalar(select(ChangeCounter.generation))


async def moves(store, change) -> bool:
    """True if `change(tx)` moved the counter."""
    before = await generation(store)
    async with store.transaction() as tx:
        await change(tx)
    return await generation(store) > before


async def test_what_a_check_in_depends_on_moves_the_counter(store):
    factory, ca, _ = await setup_device(store)

    async def config_set(tx):
        await put_config_files(
            tx, factory.id, ConfigScope.FACTORY, "", {"a": ConfigValue("1")}, changed_by="t"
        )

    async def group_move(tx):
        (await devices.get_device(tx, "dev-1")).group_name = "other"

    async def new_current_certificate(tx):
        await tx.execute(update(Device).values(current_cert_id=None))

    async def ca_disabled(tx):
        await cas.set_ca_status(tx, ca.id, CaStatus.DISABLED)

    async def deleted(tx):
        await devices.soft_delete_device(tx, "dev-1")

    for change in (config_set, group_move, new_current_certificate, ca_disabled, deleted):
        assert await moves(store, change), change.__name__


async def test_what_a_check_in_does_not_depend_on_leaves_it(store):
    _, _, _ = await setup_device(store)

    async def seen(tx):
        await devices.mark_seen(tx, "dev-1", dt.datetime.now(dt.UTC))

    async def next_key(tx):
        await devices.set_next_key(tx, "dev-1", "PEM", secrets.token_hex(32))

    async def same_group_again(tx):
        await tx.execute(update(Device).values(group_name="lab"))

    for change in (seen, next_key, same_group_again):
        assert not await moves(store, change), change.__name__


async def test_moving_a_device_to_another_group_is_a_change_of_its_config(store, db_url):
    factory, _, _ = await setup_device(store)
    device = "00000000-0000-4000-8000-000000000001"
    async with store.transaction() as tx:
        row = await devices.add_device(
            tx, device, factory_id=factory.id, registered_via="online", group_name="lab"
        )
    before = await generation(store)
    change = await config_admin.move_to_group(
        db_url, device, "west", reason="relocated", actor="op"
    )
    assert change is not None and change.scope == "device" and change.key == device
    assert change.reason == "moved from group lab to west: relocated" and change.files == []
    assert await generation(store) > before
    assert (
        await config_admin.move_to_group(db_url, device, "west", reason="again", actor="op") is None
    )
    async with store.transaction() as tx:
        row = await devices.get_device(tx, device)
        history = await config_history(tx, factory.id, ConfigScope.DEVICE, device)
    assert row.group_name == "west" and len(history) == 1
