"""`certfleet events tail` as a real process, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json

from certfleet.events import names
from certfleet.store import outbox

from .cli_run import BIN, certfleet


async def tail(db_url: str, *args: str, expect: int = 0):
    return await asyncio.to_thread(
        certfleet, "events", "tail", "--database", db_url, *args, expect=expect
    )


def records(done) -> list[dict]:
    return [json.loads(line) for line in done.stdout.splitlines()]


async def add(store, topic: str, device: str | None, **data) -> str:
    async with store.transaction() as tx:
        row = await outbox.append_event(tx, topic, data, device_uuid=device)
    return str(row.id)


async def test_tail_prints_events_with_their_state_and_filters(store, db_url):
    registered = await add(store, names.DEVICE_REGISTERED, "dev-a", group="lab")
    issued = await add(store, names.CERT_ISSUED, "dev-b", serial="0a")
    changed = await add(store, names.DEVICE_PUBKEY_CHANGE, "dev-a", new="PEM")
    revoked = await add(store, names.CA_REVOKED, None, ca="local-ca-1")
    async with store.transaction() as tx:
        await outbox.mark_delivered(tx, [int(registered)])

    everything = records(await tail(db_url, "--json"))
    assert [r["id"] for r in everything] == [registered, issued, changed, revoked]
    first = everything[0]
    assert first["topic"] == names.DEVICE_REGISTERED and first["device"] == "dev-a"
    assert first["data"] == {"group": "lab"} and first["time"].endswith("Z")
    assert first["delivered_at"].endswith("Z") and first["next_attempt_at"] is None
    assert everything[1]["delivered_at"] is None and everything[1]["attempts"] == 0

    by_device = records(await tail(db_url, "--json", "--device", "dev-a"))
    assert [r["id"] for r in by_device] == [registered, changed]
    by_topic = records(await tail(db_url, "--json", "--topic", names.CERT_ISSUED))
    assert [r["id"] for r in by_topic] == [issued]
    newest = records(await tail(db_url, "--json", "--limit", "2"))
    assert [r["id"] for r in newest] == [changed, revoked]

    people = (await tail(db_url)).stdout
    assert names.DEVICE_PUBKEY_CHANGE in people and "delivered" in people and "pending" in people


async def test_follow_prints_new_events_as_they_are_written(store, db_url):
    await add(store, names.DEVICE_REGISTERED, "dev-c")
    latest = await add(store, names.DEVICE_CONFIG_APPLIED, "dev-c")
    process = await asyncio.create_subprocess_exec(
        str(BIN / "certfleet"), "events", "tail", "--database", db_url,
        "--json", "--follow", "--device", "dev-c", "--limit", "1",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        first = json.loads(await asyncio.wait_for(process.stdout.readline(), 30))
        await add(store, names.CERT_ISSUED, "dev-d")
        new = await add(store, names.CERT_ISSUED, "dev-c", serial="0b")
        # The event --limit left out is not printed by the follow polls either.
        line = json.loads(await asyncio.wait_for(process.stdout.readline(), 30))
    finally:
        process.terminate()
        await process.wait()
    assert first["id"] == latest
    assert line["id"] == new and line["data"] == {"serial": "0b"}


async def test_tail_of_a_missing_store_is_one_line_and_exit_2(tmp_path):
    missing = f"sqlite:///{tmp_path / 'nothing.db'}"
    done = await tail(missing, expect=2)
    assert "no store at" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "nothing.db").exists()
