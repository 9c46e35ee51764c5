"""Event settings from the server's TOML file, and the sinks and loop they make.

[events]
poll_interval = 0.5          # seconds between polls when idle
batch = 100

[[events.webhooks]]
url = "https://hooks.example.net/certfleet"
secret = "at least 16 characters"
timeout = 10                 # seconds

[events.nats]
url = "nats://127.0.0.1:4222"
subject_prefix = "certfleet"  # subjects are <prefix>.<topic>
stream = "CERTFLEET"
duplicate_window = 3600       # seconds JetStream remembers message ids
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from certfleet.events.delivery import DeliveryLoop
from certfleet.events.nats import NatsSink
from certfleet.events.sink import Sink
from certfleet.events.webhook import WebhookSink, display_url
from certfleet.store.engine import Store

MIN_SECRET_LENGTH = 16
SUBJECT_PREFIX = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")


class EventsConfigError(ValueError):
    """A setting under [events] cannot work; the message names it."""


@dataclass(frozen=True)
class WebhookSettings:
    """One webhook receiver."""

    url: str = field(repr=False)
    secret: str = field(repr=False)
    timeout: float = 10.0

    def __repr__(self) -> str:
        return f"WebhookSettings(url={display_url(self.url)!r}, timeout={self.timeout})"


@dataclass(frozen=True)
class NatsSettings:
    """A NATS JetStream server to publish to."""

    url: str = field(default="nats://127.0.0.1:4222", repr=False)
    subject_prefix: str = "certfleet"
    stream: str = "CERTFLEET"
    duplicate_window: float = 3600.0


@dataclass(frozen=True)
class EventsSettings:
    """Everything under [events]."""

    webhooks: tuple[WebhookSettings, ...] = ()
    nats: NatsSettings | None = None
    poll_interval: float = 0.5
    batch: int = 100


def parse_events_settings(settings: Mapping[str, Any]) -> EventsSettings:
    """Read the [events] table of a parsed TOML document (the whole document)."""
    table = dict(settings.get("events") or {})
    _known(table, EventsSettings, "events")
    hooks = table.pop("webhooks", [])
    if not isinstance(hooks, list):
        raise EventsConfigError("events.webhooks must be an array of tables ([[events.webhooks]])")
    nats = table.pop("nats", None)
    parsed = EventsSettings(
        webhooks=tuple(_webhook(n, hook) for n, hook in enumerate(hooks)),
        nats=None if nats is None else _nats(nats),
        **table,
    )
    _check_loop(parsed)
    return parsed


def make_sinks(settings: EventsSettings) -> list[Sink]:
    """One sink per configured webhook, plus NATS if configured."""
    sinks: list[Sink] = [WebhookSink(h.url, h.secret, timeout=h.timeout) for h in settings.webhooks]
    if settings.nats is not None:
        n = settings.nats
        sinks.append(
            NatsSink(
                n.url,
                subject_prefix=n.subject_prefix,
                stream=n.stream,
                duplicate_window=n.duplicate_window,
            )
        )
    return sinks


def delivery_loop(store: Store, settings: EventsSettings) -> DeliveryLoop | None:
    """The loop for these settings; None when no sink is configured."""
    sinks = make_sinks(settings)
    if not sinks:
        return None
    return DeliveryLoop(store, sinks, poll_interval=settings.poll_interval, batch=settings.batch)


def _known(table: Mapping[str, Any], kind: type, where: str) -> None:
    unknown = sorted(set(table) - {f.name for f in fields(kind)})
    if unknown:
        raise EventsConfigError(f"unknown setting(s) in [{where}]: {', '.join(unknown)}")


def _webhook(number: int, table: Any) -> WebhookSettings:
    where = f"events.webhooks[{number}]"
    if not isinstance(table, Mapping):
        raise EventsConfigError(f"{where} must be a table with url and secret")
    _known(table, WebhookSettings, where)
    url, secret = table.get("url"), table.get("secret")
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise EventsConfigError(f"{where}.url must be an http:// or https:// URL")
    if not isinstance(secret, str) or len(secret) < MIN_SECRET_LENGTH:
        raise EventsConfigError(
            f"{where}.secret must be a string of at least {MIN_SECRET_LENGTH} characters"
        )
    timeout = _positive(table.get("timeout", 10.0), f"{where}.timeout")
    return WebhookSettings(url, secret, timeout)


def _nats(table: Any) -> NatsSettings:
    if not isinstance(table, Mapping):
        raise EventsConfigError("events.nats must be a table")
    _known(table, NatsSettings, "events.nats")
    parsed = NatsSettings(**table)
    if urlsplit(str(parsed.url)).scheme not in ("nats", "tls"):
        raise EventsConfigError("events.nats.url must be a nats:// or tls:// URL")
    if not SUBJECT_PREFIX.fullmatch(str(parsed.subject_prefix)):
        raise EventsConfigError("events.nats.subject_prefix must be dot-separated words")
    if not STREAM_NAME.fullmatch(str(parsed.stream)):
        raise EventsConfigError("events.nats.stream must be 1-32 letters, digits, - or _")
    _positive(parsed.duplicate_window, "events.nats.duplicate_window")
    return parsed


def _check_loop(settings: EventsSettings) -> None:
    _positive(settings.poll_interval, "events.poll_interval")
    if not isinstance(settings.batch, int) or not 1 <= settings.batch <= 10_000:
        raise EventsConfigError("events.batch must be a whole number from 1 to 10000")


def _positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise EventsConfigError(f"{name} must be a positive number of seconds")
    return float(value)
