"""`certfleet report expiry` and GET /v1/reports/expiry against data with known expiry times,
the expected numbers computed here independently; local and remote mode must agree."""

from __future__ import annotations

import datetime as dt
import json

from sqlalchemy import select

from certfleet.store import certificates
from certfleet.store.schema import Ca, CaStatus, utcnow

from .api_fixtures import ApiEnv, add_device, add_short_ca, api_env, fake_cert_fields  # noqa: F401
from .cli_run import certfleet

DAY = dt.timedelta(days=1)


def bucket(not_after: dt.datetime, now: dt.datetime) -> str:
    days = (not_after - now) / DAY
    for name, limit in (("expired", 0), ("week", 7), ("month", 30), ("quarter", 90), ("year", 365)):
        if days < limit:
            return name
    return "later"


def counted(moments: list[dt.datetime], now: dt.datetime) -> dict[str, int]:
    counts = dict.fromkeys(("expired", "week", "month", "quarter", "year", "later"), 0)
    for moment in moments:
        counts[bucket(moment, now)] += 1
    return counts


async def _seed(env: ApiEnv, now: dt.datetime) -> dict:
    """Devices whose certificates expire at known times; returns what the report must say."""
    short = await add_short_ca(env.store, "local-ca-short", now + 20 * DAY)
    plan = {
        # name: (days to expiry, days since last seen, issued by the short CA)
        "expired": (-2, 1, False),
        "away-3d": (3, 60, False),
        "here-3d": (3, 0.04, False),
        "new-10d": (10, None, False),
        "away-45d": (45, 60, True),
        "year": (200, 2, True),
        "later": (400, 2, False),
        "away-25d": (25, 45, False),
    }
    made = {}
    for name, (days, seen, by_short) in plan.items():
        made[name] = await add_device(
            env.store,
            not_after=now + days * DAY,
            last_seen=now - seen * DAY if seen is not None else None,
            issuer_ca_id=short.id if by_short else None,
        )
    # Neither counted: a deleted device, a device without certificate, a superseded certificate.
    await add_device(env.store, not_after=now + 20 * DAY, last_seen=now - 60 * DAY, deleted=True)
    await add_device(env.store, not_after=None)
    async with env.store.transaction() as session:
        await certificates.add_certificate(
            session, **fake_cert_fields(now + 5 * DAY), device_uuid=made["later"]
        )
        rows = await session.scalars(select(Ca).where(Ca.status != CaStatus.REVOKED))
        ca_expiry = [row.not_after for row in rows]
    return {
        "device_certs": counted([now + days * DAY for days, _, _ in plan.values()], now),
        "ca_certs": counted(ca_expiry, now),
        "stale": [made["away-3d"], made["away-25d"]],
        # Seen 45 days ago is not stale for 50 days; seen 60 days ago is.
        "stale_50d": [made["away-3d"], made["away-45d"]],
        "short_ca": (short.name, 2, now + 200 * DAY),
    }


def _without_time(report: dict) -> dict:
    return {key: value for key, value in report.items() if key != "generated_at"}


async def test_expiry_report_numbers_local_and_remote(api_env: ApiEnv):  # noqa: F811
    env = api_env
    now = utcnow()
    expected = await _seed(env, now)
    env.start()

    answer = env.call("GET", "/v1/reports/expiry", scope="read")
    assert answer.status == 200, answer.body
    report = answer.json()
    assert report["device_certs"] == expected["device_certs"]
    assert report["ca_certs"] == expected["ca_certs"]
    stale = report["will_miss_renewal"]
    assert (stale["not_seen_days"], stale["renewal_window_days"]) == (30, 30)
    assert stale["count"] == 2
    assert [device["uuid"] for device in stale["devices"]] == expected["stale"]
    outlived = [
        item
        for item in report["cas_expiring_before_their_certs"]
        if item["outlived_by"] == "device-certs"
    ]
    name, count, latest = expected["short_ca"]
    assert [(item["name"], item["count"]) for item in outlived] == [(name, count)]
    assert dt.datetime.fromisoformat(outlived[0]["latest_not_after"]) == latest

    wider = env.call(
        "GET", "/v1/reports/expiry?not_seen=50d&renewal_window=50d", scope="read"
    ).json()["will_miss_renewal"]
    assert [device["uuid"] for device in wider["devices"]] == expected["stale_50d"]

    where = ["--pki", str(env.pki), "--database", env.db_url]
    remote = [
        "--server",
        env.api_url,
        "--trust",
        str(env.pki / "root.crt"),
    ]
    token = {"CERTFLEET_TOKEN": env.tokens["read"]}
    local_json = json.loads(certfleet("report", "expiry", "--json", *where).stdout)
    remote_json = json.loads(certfleet("report", "expiry", "--json", *remote, env=token).stdout)
    assert _without_time(local_json) == _without_time(remote_json) == _without_time(report)

    people = certfleet("report", "expiry", *remote, env=token).stdout
    assert "within 7 days" in people and "local-ca-short" in people
    assert "2 device(s) not seen for 30 days" in people
    assert env.tokens["read"] not in people
    env.stop()
