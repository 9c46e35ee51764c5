"""GET /metrics: fleet state as Prometheus gauges, computed from the store at each scrape.

The store is shared by every worker, so a fresh registry per scrape gives the
same answer whichever worker Prometheus reaches; there is no multi-process
registry and nothing is counted on the EST or gateway paths.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from certfleet.fleet import fleet_metrics
from certfleet.fleet.fleet_metrics import FleetMetrics

from . import params
from .auth import READ
from .endpoints import Endpoint
from .keys import STORE

PATH = "/metrics"
# Cumulative windows over the expiry report's disjoint buckets.
EXPIRING_WITHIN = (
    ("7d", ("week",)),
    ("30d", ("week", "month")),
    ("90d", ("week", "month", "quarter")),
)


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: the Prometheus text exposition of the fleet's state."""
    params.query(request, ())
    started = time.perf_counter()
    found = await fleet_metrics.collect(request.app[STORE])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(found, time.perf_counter() - started))
    body = generate_latest(registry)
    # Classic metric names only, so the body is text format 0.0.4, which every Prometheus
    # (2.x and 3.x) reads; this library's CONTENT_TYPE_LATEST now says 1.0.0.
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})


class _Snapshot(Collector):
    """The gauges of one scrape, from values already read."""

    def __init__(self, found: FleetMetrics, seconds: float) -> None:
        self.found = found
        self.seconds = seconds

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Every family, in the order the docs list them."""
        yield from _device_families(self.found)
        yield _ca_family(self.found)
        yield from _campaign_families(self.found)
        yield from _store_families(self.found)
        yield GaugeMetricFamily(
            "certfleet_metrics_scrape_duration_seconds",
            "How long this scrape's store queries took.",
            value=self.seconds,
        )


def _device_families(found: FleetMetrics) -> Iterator[GaugeMetricFamily]:
    devices = GaugeMetricFamily(
        "certfleet_devices", "Devices in each status (deleted ones included).", labels=["status"]
    )
    for status, count in found.devices.items():
        devices.add_metric([status], count)
    yield devices
    buckets = found.expiry["device_certs"]
    expiring = GaugeMetricFamily(
        "certfleet_device_certificates_expiring",
        "Current device certificates already expired (within=expired) or expiring within "
        "7, 30 or 90 days from now (cumulative: 30d includes 7d).",
        labels=["within"],
    )
    expiring.add_metric(["expired"], buckets["expired"])
    for within, names in EXPIRING_WITHIN:
        expiring.add_metric([within], sum(buckets[name] for name in names))
    yield expiring
    stale = found.expiry["will_miss_renewal"]
    yield GaugeMetricFamily(
        "certfleet_devices_missing_renewal",
        f"Devices not seen for {stale['not_seen_days']} days whose certificate expires within "
        f"{stale['renewal_window_days']} days: they will miss their renewal unless they come back.",
        value=stale["count"],
    )


def _ca_family(found: FleetMetrics) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        "certfleet_ca_certificate_expiry_timestamp_seconds",
        "When each CA and server certificate of the store expires (notAfter, Unix time).",
        labels=["factory", "ca", "kind", "status"],
    )
    for ca in found.cas:
        family.add_metric([ca.factory, ca.name, ca.kind, ca.status], ca.not_after.timestamp())
    return family


def _campaign_families(found: FleetMetrics) -> Iterator[GaugeMetricFamily]:
    info = GaugeMetricFamily(
        "certfleet_campaign_info",
        "1 for each running or paused campaign and each that ended in the last day, "
        "labelled with its status.",
        labels=["campaign", "status"],
    )
    devices = GaugeMetricFamily(
        "certfleet_campaign_devices",
        "Devices of each campaign shown in certfleet_campaign_info, per state.",
        labels=["campaign", "state"],
    )
    for campaign in found.campaigns:
        info.add_metric([str(campaign.id), campaign.status], 1)
        for state, count in campaign.counts.items():
            devices.add_metric([str(campaign.id), state], count)
    yield info
    yield devices


def _store_families(found: FleetMetrics) -> Iterator[GaugeMetricFamily]:
    yield GaugeMetricFamily(
        "certfleet_denylist_entries",
        "Certificates on the deny-list.",
        value=found.denylist_entries,
    )
    yield GaugeMetricFamily(
        "certfleet_outbox_undelivered_events",
        "Events queued for webhooks/NATS and not yet delivered.",
        value=found.outbox.undelivered,
    )
    yield GaugeMetricFamily(
        "certfleet_outbox_oldest_undelivered_age_seconds",
        "Age of the oldest undelivered event (0 when none): grows when delivery is stuck.",
        value=found.outbox.oldest_age_seconds,
    )


def metrics_endpoints() -> list[Endpoint]:
    """The /metrics route, for the admin API app and its OpenAPI document."""
    return [
        Endpoint(
            "GET",
            PATH,
            metrics,
            READ,
            "Fleet state as Prometheus gauges (text exposition format 0.0.4), "
            "computed from the store at each scrape",
            {"type": "string"},
            media_type="text/plain",
        )
    ]
