"""Factories, CAs, devices and certificates."""

import secrets
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from certfleet.store import DuplicateError, NotFoundError
from certfleet.store.cas import add_ca, get_ca, get_ca_by_name, list_cas, set_ca_status
from certfleet.store.certificates import (
    add_certificate,
    get_certificate,
    list_device_certificates,
)
from certfleet.store.devices import add_device, get_device, list_devices, soft_delete_device
from certfleet.store.factories import add_factory, get_factory, list_factories
from certfleet.store.schema import CaKind, CaStatus, Certificate, Factory, RegisteredVia

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def fingerprint() -> str:
    return secrets.token_hex(32)


async def count(store, model) -> int:
    async with store.transaction() as tx:
        return await tx.scalar(select(func.count()).select_from(model))


@pytest.fixture
async def factory(store) -> Factory:
    async with store.transaction() as tx:
        return await add_factory(tx, "acme")


async def new_ca(tx, factory, name="online-1", kind=CaKind.ONLINE):
    return await add_ca(
        tx,
        factory_id=factory.id,
        name=name,
        kind=kind,
        cert_pem="-----BEGIN CERTIFICATE-----\n...",
        sha256=fingerprint(),
        subject=f"CN={name},OU=acme",
        not_before=NOW,
        not_after=NOW + timedelta(days=3650),
        key_ref="pkcs11:token=certfleet;object=online-1",
    )


async def new_cert(tx, device_uuid=None, issuer_ca_id=None, sha256=None, serial=None):
    return await add_certificate(
        tx,
        serial=serial or secrets.token_hex(16),
        sha256=sha256 or fingerprint(),
        subject=f"CN={device_uuid},OU=acme",
        pubkey_sha256=fingerprint(),
        not_before=NOW,
        not_after=NOW + timedelta(days=365),
        cert_pem="-----BEGIN CERTIFICATE-----\n...",
        issuer_ca_id=issuer_ca_id,
        device_uuid=device_uuid,
    )


async def test_duplicate_factory_is_refused_and_nothing_written(store, factory):
    with pytest.raises(DuplicateError, match="factory 'acme' already exists"):
        async with store.transaction() as tx:
            await add_factory(tx, "other")
            await add_factory(tx, "acme")
    assert await count(store, Factory) == 1


async def test_transaction_survives_a_caught_duplicate(store, factory):
    async with store.transaction() as tx:
        with pytest.raises(DuplicateError):
            await add_factory(tx, "acme")
        await add_factory(tx, "globex")
    async with store.transaction() as tx:
        assert [f.name for f in await list_factories(tx)] == ["acme", "globex"]


async def test_unknown_factory(store):
    async with store.transaction() as tx:
        with pytest.raises(NotFoundError, match="no factory named 'nope'"):
            await get_factory(tx, "nope")


async def test_timestamps_come_back_utc_aware(store, factory):
    async with store.transaction() as tx:
        loaded = await get_factory(tx, "acme")
    assert loaded.created_at.tzinfo is UTC
    assert abs(loaded.created_at - datetime.now(UTC)) < timedelta(minutes=1)


async def test_cas_by_factory_fingerprint_name_and_status(store, factory):
    async with store.transaction() as tx:
        root = await new_ca(tx, factory, "root", CaKind.ROOT)
        online = await new_ca(tx, factory, "online-1")
    async with store.transaction() as tx:
        assert [c.name for c in await list_cas(tx, factory.id)] == ["root", "online-1"]
        assert [c.name for c in await list_cas(tx, factory.id, kind=CaKind.ROOT)] == ["root"]
        assert (await get_ca(tx, online.sha256.upper())).id == online.id
        assert (await get_ca_by_name(tx, factory.id, "root")).sha256 == root.sha256
        changed = await set_ca_status(tx, online.id, CaStatus.DISABLED)
    assert changed.status == "disabled"
    assert changed.status_changed_at is not None
    async with store.transaction() as tx:
        assert (await get_ca(tx, online.sha256)).status == CaStatus.DISABLED
        with pytest.raises(DuplicateError):
            await new_ca(tx, factory, "root", CaKind.ROOT)
        with pytest.raises(NotFoundError):
            await get_ca_by_name(tx, factory.id, "local-9")


async def test_devices_add_get_list_soft_delete(store, factory):
    async with store.transaction() as tx:
        for n, group in enumerate(["east", "east", "west", None]):
            await add_device(
                tx, f"d-{n}", factory_id=factory.id, registered_via="online", group_name=group
            )
    async with store.transaction() as tx:
        assert (await get_device(tx, "d-2")).group_name == "west"
        assert [d.uuid for d in await list_devices(tx, group_name="east")] == ["d-0", "d-1"]
        assert len(await list_devices(tx, factory_id=factory.id)) == 4
        assert [d.uuid for d in await list_devices(tx, after_uuid="d-1", limit=1)] == ["d-2"]
        await soft_delete_device(tx, "d-0")
    async with store.transaction() as tx:
        with pytest.raises(NotFoundError, match="no device d-0"):
            await get_device(tx, "d-0")
        assert (await get_device(tx, "d-0", include_deleted=True)).deleted_at is not None
        assert [d.uuid for d in await list_devices(tx, group_name="east")] == ["d-1"]
        with pytest.raises(DuplicateError, match="d-0 is already registered"):
            await add_device(tx, "d-0", factory_id=factory.id, registered_via=RegisteredVia.EST)


async def test_certificates_of_a_device_and_current_cert(store, factory):
    async with store.transaction() as tx:
        ca = await new_ca(tx, factory)
        device = await add_device(tx, "d-1", factory_id=factory.id, registered_via="online")
        first = await new_cert(tx, "d-1", ca.id)
        second = await new_cert(tx, "d-1", ca.id)
        device.current_cert_id = second.id
    async with store.transaction() as tx:
        assert [c.id for c in await list_device_certificates(tx, "d-1")] == [first.id, second.id]
        assert (await get_device(tx, "d-1")).current_cert_id == second.id
        assert (await get_certificate(tx, first.sha256)).serial == first.serial
        with pytest.raises(NotFoundError):
            await get_certificate(tx, fingerprint())


async def test_duplicate_certificate_is_refused_and_nothing_written(store, factory):
    async with store.transaction() as tx:
        ca = await new_ca(tx, factory)
        taken = await new_cert(tx, issuer_ca_id=ca.id)
    with pytest.raises(DuplicateError, match="already stored"):
        async with store.transaction() as tx:
            await new_cert(tx, issuer_ca_id=ca.id)
            await new_cert(tx, issuer_ca_id=ca.id, sha256=taken.sha256)
    with pytest.raises(DuplicateError):
        async with store.transaction() as tx:
            await new_cert(tx, issuer_ca_id=ca.id, serial=taken.serial)
    assert await count(store, Certificate) == 1
