"""Transactions: all or nothing, including the outbox event about the change."""

import pytest
from sqlalchemy import func, select

from certfleet.store.denylist import add_denied, is_denied
from certfleet.store.factories import add_factory, list_factories
from certfleet.store.outbox import append_event, fetch_undelivered
from certfleet.store.schema import OutboxEvent


class Boom(Exception):
    pass


async def test_exception_rolls_back_the_change_and_its_event(store):
    with pytest.raises(Boom):
        async with store.transaction() as tx:
            await add_factory(tx, "acme")
            await add_denied(tx, "ab" * 32, reason="breach")
            await append_event(tx, "DENYLIST_CHANGED", {"sha256": "ab" * 32})
            raise Boom
    async with store.transaction() as tx:
        assert await list_factories(tx) == []
        assert not await is_denied(tx, "ab" * 32)
        assert await tx.scalar(select(func.count()).select_from(OutboxEvent)) == 0


async def test_success_commits_the_change_and_its_event(store):
    async with store.transaction() as tx:
        await add_denied(tx, "cd" * 32, reason="breach")
        await append_event(tx, "DENYLIST_CHANGED", {"sha256": "cd" * 32})
    async with store.transaction() as tx:
        assert await is_denied(tx, "cd" * 32)
        assert [e.topic for e in await fetch_undelivered(tx)] == ["DENYLIST_CHANGED"]
