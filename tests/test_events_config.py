"""[events] settings: sinks from TOML, refusals that name the setting, no secrets in repr."""

from __future__ import annotations

import tomllib

import pytest

from certfleet.events.config import (
    EventsConfigError,
    delivery_loop,
    make_sinks,
    parse_events_settings,
)
from certfleet.events.nats import NatsSink
from certfleet.events.webhook import WebhookSink

SECRET = "webhook-secret-0123456789"

FULL = f"""
[events]
poll_interval = 1
batch = 50

[[events.webhooks]]
url = "http://127.0.0.1:8080/hook?token=url-token-secret"
secret = "{SECRET}"

[[events.webhooks]]
url = "https://user:url-password@127.0.0.1/other"
secret = "{SECRET}-2"
timeout = 3

[events.nats]
url = "nats://127.0.0.1:4222"
subject_prefix = "acme.certfleet"
stream = "ACME_EVENTS"
"""


def parse(text: str):
    return parse_events_settings(tomllib.loads(text))


def test_full_settings_make_two_webhooks_and_nats():
    settings = parse(FULL)
    assert settings.poll_interval == 1 and settings.batch == 50
    assert [h.timeout for h in settings.webhooks] == [10.0, 3.0]
    sinks = make_sinks(settings)
    assert [type(s) for s in sinks] == [WebhookSink, WebhookSink, NatsSink]
    assert sinks[0].name == "webhook http://127.0.0.1:8080/hook"
    assert sinks[1].name == "webhook https://127.0.0.1/other"
    assert sinks[2].subject("CERT_ISSUED") == "acme.certfleet.CERT_ISSUED"
    assert sinks[2].stream == "ACME_EVENTS"


def test_no_secret_or_url_credential_shows_in_reprs():
    settings = parse(FULL)
    shown = repr(settings) + repr(make_sinks(settings))
    for secret in (SECRET, "url-token-secret", "url-password"):
        assert secret not in shown
    assert "127.0.0.1:8080/hook" in shown


def test_no_events_table_means_no_sinks_and_no_loop():
    settings = parse("")
    assert settings.webhooks == () and settings.nats is None
    assert delivery_loop(store=None, settings=settings) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[events]\nretries = 3", "unknown setting(s) in [events]: retries"),
        ('[[events.webhooks]]\nurl = "http://127.0.0.1/h"', "events.webhooks[0].secret"),
        (f'[[events.webhooks]]\nurl = "ftp://127.0.0.1/h"\nsecret = "{SECRET}"', "http://"),
        ('[[events.webhooks]]\nurl = "http://127.0.0.1/h"\nsecret = "short"', "16 characters"),
        (f'[[events.webhooks]]\nurl = "http://h"\nsecret = "{SECRET}"\ntimeout = 0', "timeout"),
        (f'[[events.webhooks]]\nurl = "http://h"\nsecret = "{SECRET}"\nverify = 1', "verify"),
        ('[events]\nwebhooks = "http://h"', "array of tables"),
        ('[events.nats]\nurl = "http://127.0.0.1:4222"', "nats://"),
        ('[events.nats]\nstream = "has.dot"', "events.nats.stream"),
        ('[events.nats]\nsubject_prefix = "a.>"', "subject_prefix"),
        ("[events]\nbatch = 0", "events.batch"),
        ('[events]\npoll_interval = "fast"', "events.poll_interval"),
    ],
)
def test_settings_that_cannot_work_are_refused_by_name(text, message):
    with pytest.raises(EventsConfigError) as refused:
        parse(text)
    assert message in str(refused.value)
    assert SECRET not in str(refused.value)
