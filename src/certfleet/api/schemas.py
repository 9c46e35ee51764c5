"""JSON Schemas (OpenAPI 3.1 components) of what the admin API answers and accepts."""

from __future__ import annotations

from typing import Any

from certfleet.fleet.device_views import STATUSES

_STR = {"type": "string"}
_OPT_STR = {"type": ["string", "null"]}
_TIME = {"type": "string", "format": "date-time"}
_OPT_TIME = {"type": ["string", "null"], "format": "date-time"}
_INT = {"type": "integer"}
_BUCKETS = {
    "type": "object",
    "description": "Disjoint buckets of not_after counted from now: expired, within 7 days, "
    "7-30 days, 30-90 days, 90-365 days, later",
    "properties": {name: _INT for name in ("expired", "week", "month", "quarter", "year", "later")},
}


def ref(name: str) -> dict[str, Any]:
    """A reference to a component schema."""
    return {"$ref": f"#/components/schemas/{name}"}


def page(item: str) -> dict[str, Any]:
    """A listing page of ``item``."""
    return {
        "type": "object",
        "required": ["items", "next"],
        "properties": {
            "items": {"type": "array", "items": ref(item)},
            "next": {**_OPT_STR, "description": "Cursor of the next page; null on the last"},
        },
    }


def _object(**properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties}


_CERT = _object(
    serial=_STR,
    sha256=_STR,
    not_before=_TIME,
    not_after=_TIME,
    days_left=_INT,
    issuer=_OPT_STR,
    status=_STR,
    denied={"type": "boolean"},
)
_SUMMARY = _object(
    uuid=_STR,
    factory=_STR,
    group=_OPT_STR,
    status={"type": "string", "enum": list(STATUSES)},
    registered_via=_STR,
    created_at=_TIME,
    last_seen_at=_OPT_TIME,
    deleted_at=_OPT_TIME,
    config_locked={"type": "boolean"},
    cert={"oneOf": [_CERT, {"type": "null"}]},
)
_ROTATION = _object(id=_STR, status=_STR, started_at=_TIME, updated_at=_TIME, last_step=_OPT_STR)
_DENIED = _object(
    sha256=_STR, serial=_OPT_STR, device=_OPT_STR, reason=_STR, new={"type": "boolean"}
)
_EVENT = _object(
    id=_STR,
    step=_STR,
    device_time=_OPT_TIME,
    received_at=_TIME,
    success={"type": ["boolean", "null"]},
    target=_OPT_STR,
    version=_OPT_STR,
    details=_OPT_STR,
)
_OUTLIVED = _object(
    name=_STR,
    factory=_STR,
    kind=_STR,
    not_after=_TIME,
    outlived_by={"type": "string", "enum": ["device-certs", "cas"]},
    count=_INT,
    latest_not_after=_TIME,
)
_STALE = _object(uuid=_STR, factory=_STR, group=_OPT_STR, last_seen_at=_TIME, not_after=_TIME)

COMPONENTS: dict[str, dict[str, Any]] = {
    "Error": {
        "type": "object",
        "required": ["error", "message", "request_id"],
        "properties": {"error": _STR, "message": _STR, "request_id": _STR},
    },
    "DeviceSummary": _SUMMARY,
    "DeviceDetail": {
        "allOf": [
            ref("DeviceSummary"),
            _object(
                next_pubkey_sha256=_OPT_STR,
                certificates=_INT,
                rotation={"oneOf": [_ROTATION, {"type": "null"}]},
            ),
        ]
    },
    "Denied": _DENIED,
    "DeviceDeleted": _object(
        uuid=_STR, deleted_at=_TIME, denied={"type": "array", "items": ref("Denied")}
    ),
    "DenyRequest": {
        "type": "object",
        "required": ["reason"],
        "additionalProperties": False,
        "properties": {"reason": {"type": "string", "minLength": 1, "maxLength": 1000}},
    },
    "UpdateSummary": _object(
        correlation_id=_STR,
        kind=_STR,
        status=_STR,
        created_at=_TIME,
        updated_at=_TIME,
        events=_INT,
    ),
    "UpdateTimeline": _object(
        correlation_id=_STR, kind=_STR, status=_STR, events={"type": "array", "items": _EVENT}
    ),
    "ExpiryReport": _object(
        generated_at=_TIME,
        device_certs=_BUCKETS,
        ca_certs=_BUCKETS,
        will_miss_renewal=_object(
            not_seen_days=_INT,
            renewal_window_days=_INT,
            count=_INT,
            devices={"type": "array", "items": _STALE},
        ),
        cas_expiring_before_their_certs={"type": "array", "items": _OUTLIVED},
    ),
    "Ca": _object(
        factory=_STR,
        name=_STR,
        kind=_STR,
        subject=_STR,
        issuer=_STR,
        serial=_STR,
        sha256=_STR,
        not_before=_TIME,
        not_after=_TIME,
        status=_STR,
        key=_STR,
        key_ref=_OPT_STR,
    ),
}
