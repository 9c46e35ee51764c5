"""Event topics and the JSON envelope every sink receives.

An envelope is ``{"id", "topic", "device", "time", "data"}``: ``id`` is the
outbox row id as a string (the same on every redelivery, so receivers
de-duplicate by it), ``device`` the device uuid or null, ``time`` when the
event was written (UTC, RFC 3339) and ``data`` the topic's payload.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from certfleet.protocol import (  # noqa: F401 (re-exported for events users)
    ALERTS,
    CA_ADDED,
    CA_DISABLED,
    CA_REVOKED,
    CERT_ISSUED,
    DENYLIST_ADDED,
    DEVICE_CONFIG_APPLIED,
    DEVICE_CONFIG_CHANGED,
    DEVICE_DELETED,
    DEVICE_PUBKEY_CHANGE,
    DEVICE_REGISTERED,
    NEXT_KEY_REFUSED,
    ROTATION_STEP,
    TOPICS,
    rfc3339,
)
from certfleet.store.schema import OutboxEvent


@dataclass(frozen=True)
class Envelope:
    """One event as delivered to webhooks and NATS."""

    id: str
    topic: str
    device: str | None
    time: str
    data: dict[str, Any]

    @classmethod
    def of(cls, event: OutboxEvent) -> Envelope:
        """The envelope of an outbox row."""
        return cls(
            str(event.id), event.topic, event.device_uuid, rfc3339(event.created_at), event.payload
        )

    def to_dict(self) -> dict[str, Any]:
        """The envelope as a JSON-ready dict."""
        return {
            "id": self.id,
            "topic": self.topic,
            "device": self.device,
            "time": self.time,
            "data": self.data,
        }

    def body(self) -> bytes:
        """The exact bytes sent (and signed): compact JSON with sorted keys."""
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True).encode()
