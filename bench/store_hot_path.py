"""CPU per call of the store's hot path (store/hot_path.py), in this process, SQLite and PostgreSQL.

What the server spends in the store per request, without TLS or HTTP: an
EST issue (the client's row, then certificate, event and audit row in one
transaction), a gateway check-in read, the client read alone, the deny-list
poll, and for scale an empty hop to a thread and back (SQLite's per-request
overhead) and one write transaction with its fsync. CPU is this process's
utime+stime (time.process_time, all threads); PostgreSQL's own work happens
in its server processes and is not counted, as in the other benchmarks.

    .venv/bin/python bench/store_hot_path.py [-n 1000] [--db sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import secrets
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg

from certfleet.store import certificates, devices, factories, open_store
from certfleet.store.engine import Store
from certfleet.store.hot_rows import ClientLookup, ClientRow, Issue, NewCertificate, Seen

HOST = "127.0.0.1"
PG_BASE = f"postgresql://postgres@{HOST}:5432/test"
RESULTS = Path(__file__).parent / "results" / "store_hot_path.json"
NOW = dt.datetime.now(dt.UTC)


async def setup(store: Store) -> ClientLookup:
    async with store.transaction() as tx:
        factory = await factories.add_factory(tx, "bench")
        await devices.add_device(tx, "dev-1", factory_id=factory.id, registered_via="online")
        cert = await certificates.add_certificate(
            tx,
            serial="01",
            sha256=secrets.token_hex(32),
            subject="CN=dev-1",
            pubkey_sha256=secrets.token_hex(32),
            not_before=NOW,
            not_after=NOW + dt.timedelta(days=365),
            cert_pem="PEM",
            device_uuid="dev-1",
        )
    return ClientLookup(cert.sha256, factory.id, 0)


def decide(row: ClientRow | None) -> Issue:
    assert row is not None and row.device_uuid == "dev-1"
    sha256 = secrets.token_hex(32)
    cert = NewCertificate(
        secrets.token_hex(16), sha256, "CN=dev-1", secrets.token_hex(32), NOW,
        NOW + dt.timedelta(days=365), "-----BEGIN CERTIFICATE-----" + "A" * 700, None,
        "dev-1", "est:simplereenroll:bench",
    )  # fmt: skip
    payload = {"uuid": "dev-1", "serial": cert.serial, "sha256": sha256, "request": "bench"}
    return Issue(cert, "CERT_ISSUED", payload, "est:bench", "est.simplereenroll", payload)


async def per_call(n: int, call) -> float:
    """µs of CPU per call, after a warm-up."""
    for _ in range(20):
        await call()
    start = time.process_time()
    for _ in range(n):
        await call()
    return round((time.process_time() - start) / n * 1e6, 1)


async def measure(url: str, n: int) -> dict[str, float]:
    store = await open_store(url, upgrade=True)
    try:
        lookup = await setup(store)
        hot = store.hot_path()
        seen = [Seen("dev-1", NOW)]
        result = {
            "issue": await per_call(n, lambda: hot.issue(lookup, decide)),
            "checkin": await per_call(n, lambda: hot.checkin(lookup.sha256)),
            "client": await per_call(n, lambda: hot.client(lookup)),
            "denied_poll": await per_call(n, lambda: hot.denied_poll(0, [], 100)),
            "mark_seen (one write transaction)": await per_call(n, lambda: hot.mark_seen(seen)),
        }
        if store.db.is_sqlite:
            thread = ThreadPoolExecutor(1)
            loop = asyncio.get_running_loop()
            result["empty hop to a thread"] = await per_call(
                n, lambda: loop.run_in_executor(thread, int)
            )
        return result
    finally:
        await store.close()


async def pg_schema(sql: str) -> None:
    conn = await asyncpg.connect(host=HOST, user="postgres", database="test")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def run(args: argparse.Namespace) -> dict:
    rows = {}
    with tempfile.TemporaryDirectory(prefix="store-bench-") as tmp:
        if "sqlite" in args.db:
            rows["sqlite"] = await measure(f"sqlite:///{tmp}/bench.db", args.n)
        if "postgresql" in args.db:
            schema = f"store_bench_{secrets.token_hex(4)}"
            await pg_schema(f"CREATE SCHEMA {schema}")
            try:
                url = f"{PG_BASE}?options=-csearch_path%3D{schema}"
                rows["postgresql"] = await measure(url, args.n)
            finally:
                await pg_schema(f"DROP SCHEMA {schema} CASCADE")
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "calls": args.n,
        "us_cpu_per_call": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000, help="calls per measurement")
    parser.add_argument("--db", default="sqlite,postgresql", type=lambda t: t.split(","))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    for db, row in result["us_cpu_per_call"].items():
        print(db)
        for name, us in row.items():
            print(f"  {name:<36} {us:>8.1f} µs CPU")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
