"""Wire names shared by every component: event topics (see docs/gateway.md) and
rotation id prefixes.

They live here, not in `events/`, so that components which may not import
`events/` (the EST server) can still name what they append to the outbox.
"""

from __future__ import annotations

from datetime import UTC, datetime

# Audit actions of a device's next key: written by the gateway (the device announces or
# withdraws it) and by the operator's unlock, read by the operator's config commands.
NEXT_KEY_ACTION = "device.next-key"
NEXT_KEY_WITHDRAWN_ACTION = "device.next-key-withdrawn"

DEVICE_REGISTERED = "DEVICE_REGISTERED"
DEVICE_DELETED = "DEVICE_DELETED"
DEVICE_PUBKEY_CHANGE = "DEVICE_PUBKEY_CHANGE"
DEVICE_CONFIG_CHANGED = "DEVICE_CONFIG_CHANGED"
DEVICE_CONFIG_APPLIED = "DEVICE_CONFIG_APPLIED"
CERT_ISSUED = "CERT_ISSUED"
CA_ADDED = "CA_ADDED"
CA_DISABLED = "CA_DISABLED"
CA_REVOKED = "CA_REVOKED"
DENYLIST_ADDED = "DENYLIST_ADDED"
ROTATION_STEP = "ROTATION_STEP"
# Rotation campaigns (certfleet.fleet.campaigns).
CAMPAIGN_CREATED = "CAMPAIGN_CREATED"
CAMPAIGN_PAUSED = "CAMPAIGN_PAUSED"
CAMPAIGN_RESUMED = "CAMPAIGN_RESUMED"
CAMPAIGN_ABORTED = "CAMPAIGN_ABORTED"
CAMPAIGN_COMPLETED = "CAMPAIGN_COMPLETED"
CAMPAIGN_RETRIED = "CAMPAIGN_RETRIED"
CAMPAIGN_DEVICE_FAILED = "CAMPAIGN_DEVICE_FAILED"
CAMPAIGN_TOPICS = frozenset(
    {
        CAMPAIGN_CREATED,
        CAMPAIGN_PAUSED,
        CAMPAIGN_RESUMED,
        CAMPAIGN_ABORTED,
        CAMPAIGN_COMPLETED,
        CAMPAIGN_RETRIED,
        CAMPAIGN_DEVICE_FAILED,
    }
)
# Alerts: something was refused that an operator should look at.
NEXT_KEY_REFUSED = "NEXT_KEY_REFUSED"

ALERTS = frozenset({NEXT_KEY_REFUSED})
TOPICS = frozenset(
    {
        DEVICE_REGISTERED,
        DEVICE_DELETED,
        DEVICE_PUBKEY_CHANGE,
        DEVICE_CONFIG_CHANGED,
        DEVICE_CONFIG_APPLIED,
        CERT_ISSUED,
        CA_ADDED,
        CA_DISABLED,
        CA_REVOKED,
        DENYLIST_ADDED,
        ROTATION_STEP,
    }
    | ALERTS
    | CAMPAIGN_TOPICS
)

# Correlation ids of certificate rotations: operator-triggered ones are certs-<unix time>
# (the fio-rotate-certs file), the agent's renewals before expiry auto-<unix time>.
ROTATION_PREFIXES = ("certs-", "auto-")


def rfc3339(moment: datetime) -> str:
    """``moment`` in UTC as RFC 3339 with a ``Z`` suffix, as every event carries times."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
