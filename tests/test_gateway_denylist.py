"""The deny-list in every gateway process: the in-memory cache, and two real worker processes.

The cache is checked on a real store; the cross-process test starts two forked
workers sharing one socket (tests/gateway_workers.py), deny-lists a device with
`certfleet devices deny`, and shows every worker refusing it within a second.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import insert, select

from certfleet.gateway.denylist_cache import DenylistCache
from certfleet.pki.keys import cert_sha256
from certfleet.store import denylist
from certfleet.store.schema import DenylistEntry

from .cli_run import certfleet
from .gateway_fixtures import GatewayEnv, build_gateway_env

ROOT = Path(__file__).resolve().parent.parent


def digest(sha256_hex: str) -> bytes:
    return bytes.fromhex(sha256_hex)


async def deny(store, sha256: str | None = None, **fields) -> str:
    sha256 = sha256 or secrets.token_hex(32)
    async with store.transaction() as session:
        await denylist.add_denied(session, sha256, reason="test", **fields)
    return sha256


async def deny_with_id(store, entry_id: int) -> str:
    """An entry with a chosen id: what a transaction that committed late looks like."""
    sha256 = secrets.token_hex(32)
    async with store.transaction() as session:
        await session.execute(
            insert(DenylistEntry).values(id=entry_id, cert_sha256=sha256, reason="late")
        )
    return sha256


async def last_id(store) -> int:
    async with store.transaction() as session:
        return max(await session.scalars(select(DenylistEntry.id)), default=0)


# -- the cache -------------------------------------------------------------------------------


async def test_the_cache_loads_everything_at_start_and_polls_new_entries(store):
    old = [await deny(store) for _ in range(25)]
    cache = DenylistCache(store, poll_every=0.05, page_size=10)
    await cache.start()
    try:
        assert len(cache) == 25
        assert all(cache.is_denied(digest(sha)) for sha in old)
        assert not cache.is_denied(digest(secrets.token_hex(32)))
        new = await deny(store)
        for _ in range(40):
            if cache.is_denied(digest(new)):
                break
            await asyncio.sleep(0.05)
        assert cache.is_denied(digest(new))
    finally:
        await cache.stop()


async def test_an_entry_committed_late_with_a_lower_id_is_seen_at_the_next_poll(store):
    cache = DenylistCache(store, gap_seconds=5.0)
    await cache.start()
    await cache.stop()  # polled by hand below
    base = await last_id(store) + 100
    higher = await deny_with_id(store, base + 3)
    await cache.poll()
    assert cache.is_denied(digest(higher))
    late = await deny_with_id(store, base + 1)
    await cache.poll()
    assert cache.is_denied(digest(late)), "the skipped id was asked for again"


async def test_the_full_reload_catches_what_polling_gave_up_on(store):
    cache = DenylistCache(store, gap_seconds=0.01)
    await cache.start()
    await cache.stop()
    base = await last_id(store) + 100
    await deny_with_id(store, base + 3)
    await cache.poll()
    await asyncio.sleep(0.05)
    very_late = await deny_with_id(store, base + 1)
    await cache.poll()
    assert not cache.is_denied(digest(very_late)), "the gap expired"
    await cache.reload()
    assert cache.is_denied(digest(very_late))


async def test_add_denies_at_once_in_this_process(store):
    cache = DenylistCache(store)
    sha = secrets.token_hex(32)
    cache.add(sha)
    assert cache.is_denied(digest(sha))


def test_a_million_entries_stay_cheap_to_keep_and_to_look_up():
    cache = DenylistCache(store=None)  # type: ignore[arg-type]
    probes = [hashlib.sha256(b"probe %d" % i).digest() for i in range(200_000)]

    def lookup_seconds() -> float:
        start = time.perf_counter()
        for probe in probes:
            cache.is_denied(probe)
        return time.perf_counter() - start

    for i in range(1000):
        cache.add(hashlib.sha256(b"%d" % i).hexdigest())
    small = min(lookup_seconds() for _ in range(3))
    for i in range(1000, 1_000_000):
        cache.add(hashlib.sha256(b"%d" % i).hexdigest())
    assert len(cache) == 1_000_000
    large = min(lookup_seconds() for _ in range(3))
    # An O(n) lookup would be hundreds of times slower; the slack is for a busy machine.
    assert large < small * 5 + 0.05, (small, large)
    digests = cache._digests
    size = sys.getsizeof(digests) + sum(sys.getsizeof(d) for d in digests)
    assert size / len(digests) < 140, f"{size / len(digests):.0f} bytes per entry"
    assert all(len(d) == 32 for d in list(digests)[:1000])


# -- two real worker processes ---------------------------------------------------------------


class Workers:
    """tests/gateway_workers.py in the background, stopped with SIGTERM."""

    def __init__(self, env: GatewayEnv) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.gateway_workers",
                "--database",
                env.db_url,
                "--pki",
                str(env.pki["acme"]),
                "--workers",
                "2",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        line = self.process.stdout.readline()
        if not line.startswith("listening "):
            self.stop()
            raise AssertionError(f"workers did not start: {line} {self.process.stderr.read()}")
        self.port = int(line.split()[1])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
async def env(db_url, tmp_path):
    env = await build_gateway_env(db_url, tmp_path)
    try:
        yield env
    finally:
        await env.store.close()


async def ask(env: GatewayEnv, port: int, device) -> tuple[int, str, float]:
    """(status, worker pid, wall time it was sent) of GET /device on a new connection."""
    sent = time.time()
    reply = await env.call("GET", "/device", device=device, port=port)
    return reply.status, reply.headers["X-Certfleet-Worker"], sent


async def test_a_denied_certificate_is_refused_by_every_worker_within_a_second(env):
    device = await env.device()
    workers = Workers(env)
    try:
        seen: set[str] = set()
        for _ in range(30):
            answers = await asyncio.gather(*(ask(env, workers.port, device) for _ in range(8)))
            assert all(status == 200 for status, _, _ in answers), answers
            seen |= {pid for _, pid, _ in answers}
            if len(seen) == 2:
                break
        assert len(seen) == 2, "both workers answered"

        # Devices keep connecting while the operator denies, as they would.
        command = asyncio.create_task(
            asyncio.to_thread(
                certfleet,
                "devices",
                "deny",
                device.uuid,
                "--reason",
                "stolen",
                "--database",
                env.db_url,
            )  # fmt: skip
        )
        answers_seen: list[tuple[int, str, float]] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            answers_seen += await asyncio.gather(
                *(ask(env, workers.port, device) for _ in range(4))
            )
            refused_by = {pid for status, pid, _ in answers_seen if status == 403}
            if command.done() and refused_by == seen:
                break
        done = await command
        assert f"denied: certificate serial {device.cert.serial_number:x}" in done.stdout
        async with env.store.transaction() as session:
            entry = (await denylist.list_denied(session, device_uuid=device.uuid))[0]
        assert entry.cert_sha256 == cert_sha256(device.cert)
        denied_at = entry.created_at.timestamp()  # before the commit: latencies err long

        first_refusal: dict[str, float] = {}
        last_allowed: dict[str, float] = {}
        for status, pid, when in answers_seen:
            if status == 403:
                first_refusal[pid] = min(first_refusal.get(pid, when), when)
            else:
                assert status == 200
                last_allowed[pid] = max(last_allowed.get(pid, 0.0), when)
        assert set(first_refusal) == seen, "every worker refused"
        # "Within a second": no request sent more than a second after the entry
        # was written got through, whichever worker took it. Judged by when a
        # request was sent, so that a slow answer on a busy machine is no failure.
        late = {pid: round(when - denied_at, 3) for pid, when in last_allowed.items()}
        assert all(seconds <= 1.0 for seconds in late.values()), late
        refused_after = {pid: round(when - denied_at, 3) for pid, when in first_refusal.items()}
        assert max(refused_after.values()) <= 5.0, refused_after

        # From then on, every new connection is refused, whichever worker takes it.
        answers = await asyncio.gather(*(ask(env, workers.port, device) for _ in range(16)))
        assert {status for status, _, _ in answers} == {403}
    finally:
        workers.stop()
