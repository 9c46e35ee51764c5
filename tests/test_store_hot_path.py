"""The store's hot path on SQLite and PostgreSQL: the same rows as the ORM, all or nothing.

Each test builds its rows with the ORM query functions and reads or writes
them through `store.hot_path()`, so the two paths are checked against each
other on both databases.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import secrets
import sqlite3
import threading

import pytest
from sqlalchemy import func, select

from certfleet.store import DuplicateError, cas, certificates, denylist, devices, factories
from certfleet.store.config_files import ConfigValue, files_for_device, put_config_files
from certfleet.store.hot_rows import ClientLookup, ClientRow, Issue, NewCertificate, Seen
from certfleet.store.schema import (
    AuditEntry,
    CaKind,
    CaStatus,
    Certificate,
    ConfigScope,
    OutboxEvent,
    RegisteredVia,
)

NOW = dt.datetime(2026, 11, 24, 10, 30, 15, 123456, tzinfo=dt.UTC)


async def setup_device(store, *, group: str | None = "lab"):
    """A factory with an online CA, one device and its current certificate."""
    async with store.transaction() as tx:
        factory = await factories.add_factory(tx, f"f-{secrets.token_hex(3)}")
        ca = await cas.add_ca(
            tx,
            factory_id=factory.id,
            name="online-ca",
            kind=CaKind.ONLINE,
            cert_pem="PEM",
            sha256=secrets.token_hex(32),
            subject="CN=online",
            not_before=NOW,
            not_after=NOW + dt.timedelta(days=3650),
            key_ref="file:online-ca.key",
        )
        device = await devices.add_device(
            tx,
            "dev-1",
            factory_id=factory.id,
            registered_via=RegisteredVia.ONLINE,
            group_name=group,
        )
        cert = await certificates.add_certificate(
            tx,
            serial="0a",
            sha256=secrets.token_hex(32),
            subject="CN=dev-1",
            pubkey_sha256=secrets.token_hex(32),
            not_before=NOW,
            not_after=NOW + dt.timedelta(days=365),
            cert_pem="PEM",
            issuer_ca_id=ca.id,
            device_uuid=device.uuid,
        )
        device.current_cert_id = cert.id
    return factory, ca, cert


def an_issue(device_uuid: str = "dev-1", sha256: str | None = None) -> Issue:
    sha256 = sha256 or secrets.token_hex(32)
    record = NewCertificate(
        serial=secrets.token_hex(8),
        sha256=sha256,
        subject=f"CN={device_uuid}",
        pubkey_sha256=secrets.token_hex(32),
        not_before=NOW,
        not_after=NOW + dt.timedelta(days=365),
        cert_pem="-----BEGIN CERTIFICATE-----",
        issuer_ca_id=None,
        device_uuid=device_uuid,
        issued_by_request="est:simplereenroll:r1",
    )
    return Issue(
        record,
        "CERT_ISSUED",
        {"uuid": device_uuid, "sha256": sha256},
        "est:127.0.0.1",
        "est.simplereenroll",
        {"sha256": sha256, "authenticated_by": "cert:abc"},
    )


async def counts(store) -> tuple[int, int, int]:
    async with store.transaction() as tx:
        return tuple(
            [
                await tx.scalar(select(func.count()).select_from(table))
                for table in (Certificate, OutboxEvent, AuditEntry)
            ]
        )


async def test_issue_records_certificate_event_and_audit_row_together(store):
    factory, ca, cert = await setup_device(store)
    seen: list[ClientRow | None] = []
    issue = an_issue()

    def decide(row: ClientRow | None) -> Issue:
        seen.append(row)
        return issue

    lookup = ClientLookup(cert.sha256, factory.id, ca.id)
    cert_id = await store.hot_path().issue(lookup, decide)

    row = seen[0]
    assert row is not None
    assert (row.cert_id, row.serial, row.device_uuid) == (cert.id, "0a", "dev-1")
    assert (row.device_factory_id, row.device_factory) == (factory.id, factory.name)
    assert row.deleted_at is None and row.denied is False
    assert (row.issuer_name, row.issuer_status) == ("online-ca", CaStatus.ACTIVE)
    assert (row.issuing_name, row.issuing_status) == ("online-ca", CaStatus.ACTIVE)
    async with store.transaction() as tx:
        stored = await certificates.get_certificate(tx, issue.certificate.sha256)
        event = await tx.scalar(select(OutboxEvent).order_by(OutboxEvent.id.desc()))
        entry = await tx.scalar(select(AuditEntry).order_by(AuditEntry.id.desc()))
    assert stored.id == cert_id and stored.status == "active"
    assert stored.not_before == NOW and stored.not_after == NOW + dt.timedelta(days=365)
    assert stored.created_at.tzinfo is not None
    assert (event.topic, event.device_uuid, event.payload) == (
        "CERT_ISSUED",
        "dev-1",
        issue.payload,
    )
    assert (entry.actor, entry.action, entry.target, entry.details) == (
        "est:127.0.0.1",
        "est.simplereenroll",
        "dev-1",
        issue.details,
    )


async def test_a_refusal_or_a_duplicate_writes_nothing(store):
    factory, ca, cert = await setup_device(store)
    before = await counts(store)
    lookup = ClientLookup(cert.sha256, factory.id, ca.id)

    def refuse(row: ClientRow | None) -> Issue:
        raise PermissionError("refused")

    with pytest.raises(PermissionError):
        await store.hot_path().issue(lookup, refuse)
    with pytest.raises(DuplicateError):
        await store.hot_path().issue(lookup, lambda row: an_issue(sha256=cert.sha256))
    assert await counts(store) == before
    # The connection is usable afterwards: no transaction was left open.
    await store.hot_path().issue(lookup, lambda row: an_issue())
    assert await counts(store) == tuple(n + 1 for n in before)


async def test_client_row_shows_deny_list_deletion_and_ca_states(store):
    factory, ca, cert = await setup_device(store)
    hot = store.hot_path()
    assert await hot.client(ClientLookup(secrets.token_hex(32), factory.id, ca.id)) is None
    async with store.transaction() as tx:
        await denylist.add_denied(tx, cert.sha256, reason="stolen")
        await cas.set_ca_status(tx, ca.id, CaStatus.REVOKED)
        await devices.soft_delete_device(tx, "dev-1")
    row = await hot.client(ClientLookup(cert.sha256, factory.id, ca.id))
    assert row is not None and row.denied is True
    assert row.deleted_at is not None and row.deleted_at.tzinfo is not None
    assert row.issuer_status == CaStatus.REVOKED and row.issuer_changed_at is not None
    other = await hot.client(ClientLookup(cert.sha256, factory.id + 1000, ca.id))
    assert other is not None and other.issuing_name is None, "issuing CA of another factory"


async def test_checkin_row_equals_the_orm_query(store):
    factory, ca, cert = await setup_device(store)
    async with store.transaction() as tx:
        for scope, key in ((ConfigScope.FACTORY, ""), (ConfigScope.GROUP, "lab")):
            files = {"motd": ConfigValue(f"{scope} says hi")}
            await put_config_files(tx, factory.id, scope, key, files, changed_by="t")
        await devices.mark_seen(tx, "dev-1", NOW)
    async with store.transaction() as tx:
        orm = await certificates.checkin(tx, cert.sha256, with_config=True)
    hot = await store.hot_path().checkin(cert.sha256)
    assert hot is not None and orm is not None
    assert {k: getattr(hot, k) for k in orm._fields} == orm._asdict()
    assert hot.last_seen_at == NOW and hot.config_locked is False
    assert isinstance(hot.generation, int)
    assert await store.hot_path().checkin(secrets.token_hex(32)) is None


async def test_config_files_equal_the_orm_query(store):
    factory, _, _ = await setup_device(store)
    async with store.transaction() as tx:
        for scope, key in (
            (ConfigScope.FACTORY, ""),
            (ConfigScope.GROUP, "lab"),
            (ConfigScope.GROUP, "other"),
            (ConfigScope.DEVICE, "dev-1"),
        ):
            files = {
                "shared": ConfigValue(f"{scope}:{key}", ["reload"], unencrypted=True),
                f"only-{scope}": ConfigValue("x"),
            }
            await put_config_files(tx, factory.id, scope, key, files, changed_by="t")
    for group in ("lab", None):
        async with store.transaction() as tx:
            orm = await files_for_device(tx, factory.id, group, "dev-1")
        hot = await store.hot_path().config_files(factory.id, group, "dev-1")
        fields = ("name", "scope", "value", "on_changed", "unencrypted")
        assert [tuple(getattr(f, k) for k in fields) for f in hot] == [
            tuple(getattr(f, k) for k in fields) for f in orm
        ]


async def test_mark_seen_and_the_deny_list_poll(store):
    _, _, cert = await setup_device(store)
    hot = store.hot_path()
    await hot.mark_seen([Seen("dev-1", NOW)])
    async with store.transaction() as tx:
        assert (await devices.get_device(tx, "dev-1")).last_seen_at == NOW
        first = await denylist.add_denied(tx, secrets.token_hex(32), reason="a")
        second = await denylist.add_denied(tx, cert.sha256, reason="b")
    page = await hot.denied_page(0, 1)
    assert page == [(first.id, first.cert_sha256)]
    polled = await hot.denied_poll(second.id, [first.id, second.id + 50], 10)
    assert polled.rows == [(first.id, first.cert_sha256)]
    assert polled.generation == (await hot.checkin(cert.sha256)).generation


async def test_a_worker_forked_after_the_store_opened_gets_its_own_connections(store):
    _, _, cert = await setup_device(store)
    parent = store.hot_path()
    assert await parent.checkin(cert.sha256) is not None  # connections open before the fork

    async def in_worker() -> bool:
        hot = store.hot_path()
        row = await hot.checkin(cert.sha256)
        await hot.close()
        return hot is not parent and row is not None and row.device_uuid == "dev-1"

    pid = os.fork()
    if pid == 0:  # the worker: its only thread is this one, so it runs a loop in a new one
        results: list[bool] = []
        worker = threading.Thread(target=lambda: results.append(asyncio.run(in_worker())))
        worker.start()
        worker.join(20)
        os._exit(0 if results == [True] else 1)
    _, status = await asyncio.to_thread(os.waitpid, pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert await parent.checkin(cert.sha256) is not None, "the parent's connections still work"


@pytest.fixture
def sqlite_only(db_url):
    if not db_url.startswith("sqlite"):
        pytest.skip("SQLite's write lock")


async def test_sqlite_reads_take_no_write_lock(store, db_url, sqlite_only):
    factory, ca, cert = await setup_device(store)
    hot = store.hot_path()
    await hot.checkin(cert.sha256)
    other = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process writing
    try:
        # Check-ins and the deny-list poll go on; an issuing request waits.
        async with asyncio.timeout(2):
            assert await hot.checkin(cert.sha256) is not None
            await hot.denied_poll(0, [], 10)
        lookup = ClientLookup(cert.sha256, factory.id, ca.id)
        issuing = asyncio.create_task(hot.issue(lookup, lambda row: an_issue()))
        await asyncio.sleep(0.3)
        assert not issuing.done()
    finally:
        other.execute("COMMIT")
        other.close()
    assert await issuing > cert.id
