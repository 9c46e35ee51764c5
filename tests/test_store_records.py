"""Audit log, config files with their change log, and EST credentials."""

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from certfleet.store import DuplicateError
from certfleet.store.audit import append_audit, list_audit
from certfleet.store.config_files import (
    ConfigValue,
    config_history,
    delete_config_files,
    list_config_files,
    put_config_files,
)
from certfleet.store.est import add_est_credential, check_secret, hash_secret
from certfleet.store.factories import add_factory
from certfleet.store.schema import ConfigScope, EstCredential


async def test_audit_newest_first_with_filters(store):
    async with store.transaction() as tx:
        for n in range(4):
            await append_audit(
                tx,
                actor="alice" if n % 2 else "bob",
                action="ca.disable",
                target=f"ca:{n % 2}",
                details={"n": n},
            )
    async with store.transaction() as tx:
        everything = await list_audit(tx)
        assert [e.details["n"] for e in everything] == [3, 2, 1, 0]
        assert [e.details["n"] for e in await list_audit(tx, actor="alice")] == [3, 1]
        assert [e.details["n"] for e in await list_audit(tx, target="ca:0")] == [2, 0]
        older = await list_audit(tx, before_id=everything[1].id, limit=1)
        assert [e.details["n"] for e in older] == [1]


async def test_config_files_upsert_delete_and_history(store):
    rotate = ConfigValue("ROTATIONID=certs-1", ["renew-client-cert"], unencrypted=True)
    async with store.transaction() as tx:
        factory = await add_factory(tx, "acme")
        scope = (factory.id, ConfigScope.GROUP, "east")
        await put_config_files(tx, *scope, {"fio-rotate-certs": rotate}, changed_by="alice")
        await put_config_files(
            tx,
            *scope,
            {
                "fio-rotate-certs": ConfigValue("ROTATIONID=certs-2"),
                "wifi": ConfigValue("c2VjcmV0"),
            },
            changed_by="bob",
            reason="second rotation",
        )
    async with store.transaction() as tx:
        files = {f.name: f for f in await list_config_files(tx, *scope)}
        assert files["fio-rotate-certs"].value == "ROTATIONID=certs-2"
        assert files["fio-rotate-certs"].on_changed == []
        assert files["fio-rotate-certs"].updated_by == "bob"
        assert await list_config_files(tx, factory.id, ConfigScope.FACTORY) == []
        await delete_config_files(tx, *scope, ["wifi"], changed_by="carol", reason="unused")
    async with store.transaction() as tx:
        assert [f.name for f in await list_config_files(tx, *scope)] == ["fio-rotate-certs"]
        history = await config_history(tx, *scope)
    assert [(h.changed_by, h.file_names) for h in history] == [
        ("carol", ["wifi"]),
        ("bob", ["fio-rotate-certs", "wifi"]),
        ("alice", ["fio-rotate-certs"]),
    ]


def test_secret_hash_checks_and_is_salted():
    stored = hash_secret("correct horse")
    assert stored.startswith("scrypt$16384$8$1$")
    assert check_secret("correct horse", stored)
    assert not check_secret("wrong horse", stored)
    assert not check_secret("correct horse", "garbage")
    assert hash_secret("correct horse") != stored


async def test_est_credential_keeps_only_the_hash(store):
    expires = datetime.now(UTC) + timedelta(hours=1)
    async with store.transaction() as tx:
        factory = await add_factory(tx, "acme")
        args = dict(factory_id=factory.id, username="dev-1", bound_subject="CN=d-1,OU=acme")
        await add_est_credential(tx, secret="one-time-pass", expires_at=expires, **args)
        with pytest.raises(DuplicateError, match="'dev-1' is taken"):
            await add_est_credential(tx, secret="other", expires_at=expires, **args)
    async with store.transaction() as tx:
        row = await tx.scalar(select(EstCredential))
    assert "one-time-pass" not in row.secret_hash
    assert check_secret("one-time-pass", row.secret_hash)
