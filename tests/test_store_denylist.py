"""The deny-list: idempotent adds, fingerprint checks, polling for new entries."""

import secrets

from certfleet.store.denylist import add_denied, denied_since, is_denied, list_denied


async def test_adding_twice_keeps_one_entry(store):
    sha = secrets.token_hex(32)
    async with store.transaction() as tx:
        first = await add_denied(tx, sha, reason="rotated", serial="0a", device_uuid="d-1")
    async with store.transaction() as tx:
        again = await add_denied(tx, sha.upper(), reason="breach")
        assert again.id == first.id
        assert again.reason == "rotated"
        assert len(await list_denied(tx)) == 1


async def test_is_denied(store):
    sha = secrets.token_hex(32)
    async with store.transaction() as tx:
        assert not await is_denied(tx, sha)
        await add_denied(tx, sha, reason="rotated")
        assert await is_denied(tx, sha)
        assert await is_denied(tx, sha.upper())
        assert not await is_denied(tx, secrets.token_hex(32))


async def test_denied_since_returns_only_newer_entries_in_order(store):
    async with store.transaction() as tx:
        old = [await add_denied(tx, secrets.token_hex(32), reason="r") for _ in range(3)]
        assert [e.id for e in await denied_since(tx, 0)] == [e.id for e in old]
        seen = old[-1].id
        assert await denied_since(tx, seen) == []
        new = [await add_denied(tx, secrets.token_hex(32), reason="r") for _ in range(2)]
        await add_denied(tx, old[0].cert_sha256, reason="again")
        fresh = await denied_since(tx, seen)
    assert [e.cert_sha256 for e in fresh] == [e.cert_sha256 for e in new]


async def test_list_denied_of_a_device_newest_first(store):
    async with store.transaction() as tx:
        a = await add_denied(tx, secrets.token_hex(32), reason="r", device_uuid="d-1")
        await add_denied(tx, secrets.token_hex(32), reason="r", device_uuid="d-2")
        b = await add_denied(tx, secrets.token_hex(32), reason="r", device_uuid="d-1")
        assert [e.id for e in await list_denied(tx, device_uuid="d-1")] == [b.id, a.id]
