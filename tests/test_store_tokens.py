"""API tokens: shown once, stored only as a hash, checked for expiry and revocation."""

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from certfleet.store import TokenRejectedError
from certfleet.store.schema import metadata
from certfleet.store.tokens import create_token, list_tokens, revoke_token, verify_token


def in_days(days: float) -> datetime:
    return datetime.now(UTC) + timedelta(days=days)


async def test_created_token_verifies_and_records_use(store):
    async with store.transaction() as tx:
        row, plain = await create_token(tx, "ci", scopes=["devices:read"], expires_at=in_days(30))
    assert row.last_used_at is None
    async with store.transaction() as tx:
        used = await verify_token(tx, plain)
    assert used.id == row.id
    assert used.scopes == ["devices:read"]
    assert used.last_used_at is not None


async def test_plain_token_is_stored_nowhere(store):
    async with store.transaction() as tx:
        _, plain = await create_token(tx, "ci", scopes=["admin"], expires_at=in_days(1))
        await verify_token(tx, plain)
    secret = plain.removeprefix("cft_")
    async with store.transaction() as tx:
        for table in metadata.sorted_tables:
            for row in await tx.execute(select(table)):
                assert secret not in repr(tuple(row)), table.name
        assert len(await list_tokens(tx)) == 1


async def test_unknown_token_is_rejected(store):
    async with store.transaction() as tx:
        await create_token(tx, "ci", scopes=[], expires_at=in_days(1))
    async with store.transaction() as tx:
        with pytest.raises(TokenRejectedError, match="unknown API token"):
            await verify_token(tx, "cft_not-a-real-token")


async def test_expired_token_is_rejected(store):
    async with store.transaction() as tx:
        _, plain = await create_token(tx, "old", scopes=[], expires_at=in_days(-1))
    with pytest.raises(TokenRejectedError, match="'old' expired"):
        async with store.transaction() as tx:
            await verify_token(tx, plain)


async def test_revoked_token_is_rejected(store):
    async with store.transaction() as tx:
        row, plain = await create_token(tx, "leaked", scopes=[], expires_at=in_days(1))
    async with store.transaction() as tx:
        first = await revoke_token(tx, row.id)
    async with store.transaction() as tx:
        again = await revoke_token(tx, row.id)
        assert again.revoked_at == first.revoked_at
        with pytest.raises(TokenRejectedError, match="'leaked' was revoked"):
            await verify_token(tx, plain)
