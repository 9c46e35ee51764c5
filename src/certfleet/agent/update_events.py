"""Update events in the reference's envelope, as the gateway's POST /events takes them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

ROTATION_STARTED = "CertRotationStarted"
ROTATION_COMPLETED = "CertRotationCompleted"


def update_event(
    step: str,
    correlation_id: str,
    success: bool,
    details: str = "",
    *,
    event_id: str | None = None,
    target: str = "",
    version: str = "",
) -> dict[str, Any]:
    """One event; a stable `event_id` makes a resent event a duplicate, not a second one."""
    return {
        "id": event_id or str(uuid.uuid4()),
        "deviceTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "event": {
            "correlationId": correlation_id,
            "success": success,
            "targetName": target,
            "version": version,
            "details": details,
        },
        "eventType": {"id": step, "version": 0},
    }


def stable_event_id(correlation_id: str, step: str, attempt: int = 0) -> str:
    """The same id for the same step of the same rotation, so a resend after a crash dedupes."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"certfleet:{correlation_id}:{step}:{attempt}"))
