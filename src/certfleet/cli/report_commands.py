"""`certfleet report ...`: fleet-wide reports, from the store or through the admin API."""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table

from certfleet.fleet.expiry_report import BUCKETS

from .common import CertfleetGroup, console, print_json
from .fleet_backend import fleet_from, fleet_options

_BUCKET_TITLES = {
    "expired": "expired",
    "week": "within 7 days",
    "month": "7-30 days",
    "quarter": "30-90 days",
    "year": "90-365 days",
    "later": "later",
}


@click.group(cls=CertfleetGroup)
def report() -> None:
    """Reports over the whole fleet."""


@report.command("expiry")
@click.option(
    "--not-seen",
    metavar="DURATION",
    help="A device not seen for this long is stale (default 30d).",
)
@click.option(
    "--renewal-window",
    metavar="DURATION",
    help="A stale device whose certificate expires within this misses its renewal (default 30d).",
)
@fleet_options
def expiry(not_seen: str | None, renewal_window: str | None, as_json: bool, **where: Any) -> None:
    """When certificates expire, which devices will miss their renewal, and CAs that expire
    before certificates they signed."""
    data = fleet_from(where).expiry(not_seen, renewal_window)
    if as_json:
        print_json(data)
        return
    console.print(_buckets(data))
    _print_stale(data["will_miss_renewal"])
    _print_outlived(data["cas_expiring_before_their_certs"])


def _buckets(data: dict[str, Any]) -> Table:
    table = Table(title=f"certificates by expiry (as of {data['generated_at'][:16]}Z)")
    table.add_column("expires")
    table.add_column("device certs", justify="right")
    table.add_column("CA and server certs", justify="right")
    for name, _ in BUCKETS:
        table.add_row(
            _BUCKET_TITLES[name], str(data["device_certs"][name]), str(data["ca_certs"][name])
        )
    return table


def _print_stale(stale: dict[str, Any]) -> None:
    title = (
        f"{stale['count']} device(s) not seen for {stale['not_seen_days']} days whose "
        f"certificate expires within {stale['renewal_window_days']} days"
    )
    if not stale["devices"]:
        console.print(title, highlight=False)
        return
    table = Table(title=title)
    for column in ("uuid", "group", "last seen", "cert expires"):
        table.add_column(column, no_wrap=True)
    for device in stale["devices"]:
        table.add_row(
            device["uuid"],
            device["group"] or "",
            _minute(device["last_seen_at"]),
            _minute(device["not_after"]),
        )
    console.print(table)


def _print_outlived(items: list[dict[str, Any]]) -> None:
    if not items:
        console.print("no CA expires before the certificates it signed", highlight=False)
        return
    table = Table(title="CAs that expire before certificates they signed")
    for column in ("factory", "CA", "kind", "expires", "outlived by", "latest expiry"):
        table.add_column(column, no_wrap=True)
    for item in items:
        table.add_row(
            item["factory"],
            item["name"],
            item["kind"],
            _minute(item["not_after"]),
            f"{item['count']} {item['outlived_by']}",
            _minute(item["latest_not_after"]),
        )
    console.print(table)


def _minute(moment: str) -> str:
    return moment[:16].replace("T", " ")
