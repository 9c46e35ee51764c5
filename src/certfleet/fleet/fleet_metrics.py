"""What the admin API's /metrics serves, read from the store at scrape time.

Every worker shares the store, so every worker answers the same; nothing is
counted in memory and nothing on the EST or gateway paths is touched.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from certfleet.fleet import device_views, expiry_report
from certfleet.store import campaigns as campaign_rows
from certfleet.store import cas, denylist, factories, outbox
from certfleet.store.engine import Store
from certfleet.store.schema import CampaignDeviceState, utcnow

# Ended campaigns stay visible this long, so an alert on their failed devices can fire
# (and resolve) after the campaign stops.
ENDED_CAMPAIGNS_SHOWN_FOR = dt.timedelta(days=1)


@dataclass(frozen=True)
class CaExpiry:
    """One CA certificate and when it expires."""

    factory: str
    name: str
    kind: str
    status: str
    not_after: dt.datetime


@dataclass(frozen=True)
class CampaignState:
    """A campaign shown in the metrics and its devices per state."""

    id: int
    status: str
    counts: dict[str, int]


@dataclass(frozen=True)
class OutboxBacklog:
    """Undelivered events and the age of the oldest, in seconds (0 when none)."""

    undelivered: int
    oldest_age_seconds: float


@dataclass(frozen=True)
class FleetMetrics:
    """One scrape's worth of fleet state."""

    devices: dict[str, int]
    expiry: dict[str, Any]
    cas: list[CaExpiry]
    campaigns: list[CampaignState]
    denylist_entries: int
    outbox: OutboxBacklog


async def collect(store: Store) -> FleetMetrics:
    """Read everything /metrics serves (a handful of count queries, see docs/operator.md)."""
    devices = await device_views.count_by_status(store)
    report = await expiry_report.device_counts(store)
    async with store.transaction() as session:
        now = utcnow()
        ca_rows = [
            CaExpiry(factory.name, ca.name, ca.kind, ca.status, ca.not_after)
            for factory in await factories.list_factories(session)
            for ca in await cas.list_cas(session, factory.id)
        ]
        shown = await _campaigns(session, now)
        denied = await denylist.count_denied(session)
        undelivered, oldest = await outbox.undelivered_backlog(session)
    age = max((now - oldest).total_seconds(), 0.0) if oldest else 0.0
    backlog = OutboxBacklog(undelivered, age)
    return FleetMetrics(devices, report, ca_rows, shown, denied, backlog)


async def _campaigns(session: AsyncSession, now: dt.datetime) -> list[CampaignState]:
    """Open campaigns and those that ended within ENDED_CAMPAIGNS_SHOWN_FOR."""
    found = await campaign_rows.open_or_ended_since(session, now - ENDED_CAMPAIGNS_SHOWN_FOR)
    counts = await campaign_rows.state_counts(session, [c.id for c in found])
    return [CampaignState(c.id, c.status, _per_state(counts[c.id])) for c in found]


def _per_state(counts: dict[tuple[str, bool], int]) -> dict[str, int]:
    """Canaries and the rest added up, every state present."""
    totals = {state.value: 0 for state in CampaignDeviceState}
    for (state, _canary), n in counts.items():
        totals[state] += n
    return totals
