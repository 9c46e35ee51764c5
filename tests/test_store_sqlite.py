"""SQLite specifics: WAL, foreign keys, busy timeout, file permissions."""

import asyncio
import stat

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from certfleet.store import open_store
from certfleet.store.devices import add_device
from certfleet.store.factories import add_factory
from certfleet.store.schema import RegisteredVia


@pytest.fixture
async def sqlite_store(tmp_path):
    store = await open_store(f"sqlite:///{tmp_path / 'new' / 'dir' / 'fleet.db'}", upgrade=True)
    yield store
    await store.close()


async def pragma(store, name):
    async with store.engine.connect() as conn:
        return (await conn.exec_driver_sql(f"PRAGMA {name}")).scalar()


async def test_every_connection_has_wal_foreign_keys_and_busy_timeout(sqlite_store):
    async def check():
        assert await pragma(sqlite_store, "journal_mode") == "wal"
        assert await pragma(sqlite_store, "foreign_keys") == 1
        assert await pragma(sqlite_store, "busy_timeout") == 5000

    # several at once, so that more than one pooled connection is used
    await asyncio.gather(*(check() for _ in range(4)))


async def test_file_and_directory_are_private(tmp_path, sqlite_store):
    path = tmp_path / "new" / "dir" / "fleet.db"
    async with sqlite_store.transaction() as tx:
        await add_factory(tx, "acme")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    wal = path.with_name("fleet.db-wal")
    assert stat.S_IMODE(wal.stat().st_mode) == 0o600


async def test_existing_loose_file_is_tightened(tmp_path):
    path = tmp_path / "old.db"
    path.touch(mode=0o644)
    path.chmod(0o644)
    store = await open_store(f"sqlite:///{path}")
    await store.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_foreign_keys_are_enforced(sqlite_store):
    with pytest.raises(IntegrityError):
        async with sqlite_store.transaction() as tx:
            await add_device(tx, "d-1", factory_id=999, registered_via=RegisteredVia.ONLINE)


async def test_concurrent_read_then_write_transactions_wait_instead_of_failing(tmp_path):
    url = f"sqlite:///{tmp_path / 'busy.db'}"
    stores = [await open_store(url, upgrade=True) for _ in range(3)]

    async def read_then_write(store, n):
        async with store.transaction() as tx:
            await tx.execute(text("SELECT count(*) FROM factories"))
            await asyncio.sleep(0.05)
            await add_factory(tx, f"f-{n}")

    try:
        await asyncio.gather(*(read_then_write(s, n) for n, s in enumerate(stores * 3)))
        async with stores[0].transaction() as tx:
            assert (await tx.execute(text("SELECT count(*) FROM factories"))).scalar() == 9
    finally:
        for store in stores:
            await store.close()
