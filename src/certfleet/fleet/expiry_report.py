"""The expiry report: when the fleet's certificates run out, and who will miss the renewal.

Buckets are disjoint and counted from now: already expired, within a week,
a week to a month (30 days), a month to a quarter (90 days), a quarter to a
year (365 days), later. A device "will miss its renewal" when it has not been
seen for `not_seen` and its current certificate expires within
`renewal_window`: a device that renews only when it connects cannot renew
in time unless it comes back soon.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.events import names
from certfleet.store import expiry_queries
from certfleet.store.engine import Store
from certfleet.store.errors import StoreError
from certfleet.store.expiry_queries import OutlivedCa, StaleDevice
from certfleet.store.schema import utcnow

BUCKETS = (
    ("expired", None),
    ("week", dt.timedelta(days=7)),
    ("month", dt.timedelta(days=30)),
    ("quarter", dt.timedelta(days=90)),
    ("year", dt.timedelta(days=365)),
    ("later", None),
)
DEFAULT_NOT_SEEN = dt.timedelta(days=30)
DEFAULT_RENEWAL_WINDOW = dt.timedelta(days=30)
MAX_LISTED = 100


def _edges(now: dt.datetime) -> list[dt.datetime]:
    return [now] + [now + span for _, span in BUCKETS[1:-1] if span is not None]


def _named(counts: list[int]) -> dict[str, int]:
    return {name: count for (name, _), count in zip(BUCKETS, counts, strict=True)}


def _stale(device: StaleDevice) -> dict[str, Any]:
    return {
        "uuid": device.uuid,
        "factory": device.factory,
        "group": device.group,
        "last_seen_at": names.rfc3339(device.last_seen),
        "not_after": names.rfc3339(device.not_after),
    }


def _outlived(item: OutlivedCa, what: str) -> dict[str, Any]:
    return {
        "name": item.ca.name,
        "factory": item.factory,
        "kind": item.ca.kind,
        "not_after": names.rfc3339(item.ca.not_after),
        "outlived_by": what,
        "count": item.count,
        "latest_not_after": names.rfc3339(item.latest),
    }


def _check(not_seen: dt.timedelta, renewal_window: dt.timedelta) -> None:
    if not_seen <= dt.timedelta(0) or renewal_window <= dt.timedelta(0):
        raise StoreError("not_seen and renewal_window must be positive durations such as 30d")


async def expiry_report(
    store: Store,
    *,
    not_seen: dt.timedelta = DEFAULT_NOT_SEEN,
    renewal_window: dt.timedelta = DEFAULT_RENEWAL_WINDOW,
    limit: int = MAX_LISTED,
) -> dict[str, Any]:
    """Counts per bucket of device and CA certificates, devices that will miss their
    renewal (the first `limit`, soonest expiry first) and CAs that expire before
    certificates they signed."""
    _check(not_seen, renewal_window)
    now = utcnow()
    edges = _edges(now)
    async with store.transaction() as session:
        devices = await _device_part(session, now, not_seen, renewal_window, limit)
        ca_counts = await expiry_queries.ca_cert_buckets(session, edges)
        outlived = await expiry_queries.cas_outlived_by_devices(session)
        roots = await expiry_queries.roots_outlived_by_cas(session)
    return {
        "generated_at": names.rfc3339(now),
        "device_certs": devices["device_certs"],
        "ca_certs": _named(ca_counts),
        "will_miss_renewal": devices["will_miss_renewal"],
        "cas_expiring_before_their_certs": [_outlived(item, "device-certs") for item in outlived]
        + [_outlived(item, "cas") for item in roots],
    }


async def device_counts(
    store: Store,
    *,
    not_seen: dt.timedelta = DEFAULT_NOT_SEEN,
    renewal_window: dt.timedelta = DEFAULT_RENEWAL_WINDOW,
) -> dict[str, Any]:
    """The report's device part without its list: `device_certs` and `will_miss_renewal`
    with an empty `devices` (two count queries, for /metrics)."""
    _check(not_seen, renewal_window)
    async with store.transaction() as session:
        return await _device_part(session, utcnow(), not_seen, renewal_window, 0)


async def _device_part(
    session: AsyncSession,
    now: dt.datetime,
    not_seen: dt.timedelta,
    renewal_window: dt.timedelta,
    limit: int,
) -> dict[str, Any]:
    device_counts = await expiry_queries.device_cert_buckets(session, _edges(now))
    stale_total, stale = await expiry_queries.stale_devices(
        session, seen_before=now - not_seen, expiring_before=now + renewal_window, limit=limit
    )
    return {
        "device_certs": _named(device_counts),
        "will_miss_renewal": {
            "not_seen_days": not_seen.days,
            "renewal_window_days": renewal_window.days,
            "count": stale_total,
            "devices": [_stale(device) for device in stale],
        },
    }
