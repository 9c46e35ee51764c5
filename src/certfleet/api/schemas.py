"""JSON Schemas (OpenAPI 3.1 components) of what the admin API answers and accepts."""

from __future__ import annotations

from typing import Any

from certfleet.fleet.device_views import STATUSES
from certfleet.store.schema import CampaignDeviceState, CampaignStatus

from .params import MAX_ID

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


# What durations.parse_duration takes, but for its bound of 100 years.
DURATION = {
    "type": "string",
    "pattern": "^(?!0+[smhdw]$)[0-9]{1,12}[smhdw]$",
    "description": "A positive number and a unit (s, m, h, d, w), at most 100 years",
}
# What fleet.reasons.checked_reason takes (printable and one line is not expressible here).
REASON = {
    "type": "string",
    "minLength": 1,
    "maxLength": 1000,
    "description": "1 to 1000 printable characters on one line; kept in the logs",
}
UUID = {
    "type": "string",
    "format": "uuid",
    "pattern": "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
}
# Path parameters by name; any other is a plain string.
PATH_PARAMS: dict[str, dict[str, Any]] = {
    "uuid": UUID,
    "id": {"type": "integer", "minimum": 1, "maximum": MAX_ID},
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
_SLOTS = {
    "type": "string",
    "description": "PKCS#11 keys only: two different hex object ids, the slot in use and "
    "the next one; give both hsm_pkey_ids and hsm_cert_ids or neither",
    "examples": ["01,07"],
}
_STALE = _object(uuid=_STR, factory=_STR, group=_OPT_STR, last_seen_at=_TIME, not_after=_TIME)

_CONFIG_CHANGE = _object(
    id=_INT,
    scope=_STR,
    key=_STR,
    changed_by=_STR,
    changed_at=_TIME,
    reason=_STR,
    files={"type": "array", "items": _STR},
)

_SPAN = {**DURATION, "examples": ["30m"]}
_SHARE = {"type": "number", "minimum": 0, "maximum": 1}
_PER_STATE = {
    "type": "object",
    "properties": {state.value: _INT for state in CampaignDeviceState},
}
_CAMPAIGN_DEVICE = _object(
    device=_STR,
    canary={"type": "boolean"},
    state={"type": "string", "enum": [state.value for state in CampaignDeviceState]},
    rotation_id=_OPT_STR,
    attempts=_INT,
    triggered_at=_OPT_TIME,
    detail=_OPT_STR,
)
_CAMPAIGN = _object(
    id=_INT,
    rotation_id=_STR,
    status={"type": "string", "enum": [status.value for status in CampaignStatus]},
    status_reason=_OPT_STR,
    reason=_STR,
    selector={
        "type": "object",
        "description": "group, all, or reissue_from_ca and to_ca, as created",
    },
    settings=_object(
        canary_share={"type": "number"},
        rate_per_minute=_INT,
        failure_threshold={"type": "number"},
        canary_deadline=_STR,
        device_deadline=_STR,
        offline_after=_STR,
        est_server=_STR,
        pkey_ids=_OPT_STR,
        cert_ids=_OPT_STR,
    ),
    created_at=_TIME,
    finished_at=_OPT_TIME,
    total=_INT,
    counts=_PER_STATE,
    canary_counts=_PER_STATE,
    devices={
        "type": "array",
        "items": _CAMPAIGN_DEVICE,
        "description": "The first N devices with ?devices=N (none in listings)",
    },
)
_CAMPAIGN_CREATE = {
    "type": "object",
    "required": ["reason"],
    "additionalProperties": False,
    "description": "Devices by exactly one of: group; all: true; reissue_from_ca with to_ca",
    "properties": {
        "group": _STR,
        "all": {"type": "boolean"},
        "reissue_from_ca": {**_STR, "description": "Devices whose current cert this CA issued"},
        "to_ca": {**_STR, "description": "The factory's active online CA they move to"},
        "reason": REASON,
        "est_server": {"type": "string", "description": "https:// EST address devices renew at"},
        "hsm_pkey_ids": _SLOTS,
        "hsm_cert_ids": _SLOTS,
        "canary_share": {**_SHARE, "description": "Share of devices that go first (0.05)"},
        "rate_per_minute": {
            "type": "integer",
            "minimum": 1,
            "maximum": 100_000,
            "description": "Default 60",
        },
        "failure_threshold": {**_SHARE, "description": "Abort above this failed share (0.1)"},
        "canary_deadline": {**_SPAN, "description": "Default 30m"},
        "device_deadline": {**_SPAN, "description": "Default 2h"},
        "offline_after": {**_SPAN, "description": "Default 7d"},
        "dryrun": {"type": "boolean", "description": "Only choose the devices and show the file"},
    },
}
_CAMPAIGN_PLAN = _object(
    dryrun={"type": "boolean", "const": True},
    devices={"type": "array", "items": _STR},
    canaries={"type": "array", "items": _STR},
    left_out={
        "type": "object",
        "additionalProperties": _INT,
        "description": "Devices left out: uuid -> the open campaign that has them",
    },
    value={**_STR, "description": "The fio-rotate-certs file each device would get"},
)

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
        "properties": {"reason": REASON},
    },
    "RotateRequest": {
        "type": "object",
        "required": ["reason"],
        "additionalProperties": False,
        "properties": {
            "reason": {**REASON, "description": "Kept in the config log"},
            "est_server": {
                "type": "string",
                "description": "https:// EST address devices renew at, as they reach it",
                "examples": ["https://est.acme.example:8443/.well-known/est"],
            },
            "hsm_pkey_ids": _SLOTS,
            "hsm_cert_ids": _SLOTS,
            "dryrun": {"type": "boolean", "description": "Only check and show the file"},
        },
    },
    "RotationTriggered": _object(
        device=_STR,
        rotation_id=_STR,
        file=_STR,
        value={**_STR, "description": "The file's content, one KEY=VALUE a line"},
        on_changed={"type": "array", "items": _STR},
        dryrun={"type": "boolean"},
    ),
    "DenyCertificateRequest": {
        "type": "object",
        "required": ["reason"],
        "additionalProperties": False,
        "description": "Exactly one of serial and sha256",
        "oneOf": [{"required": ["serial"]}, {"required": ["sha256"]}],
        "properties": {
            "serial": {"type": "string", "pattern": "^(0x)?[0-9a-fA-F:]+$"},
            "sha256": {"type": "string", "pattern": "^[0-9a-fA-F:]+$"},
            "reason": REASON,
        },
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
    "ConfigSetRequest": {
        "type": "object",
        "required": ["scope", "files", "reason"],
        "additionalProperties": False,
        "properties": {
            "scope": {"type": "string", "enum": ["factory", "group", "device"]},
            "key": {**_STR, "description": "The group, or the device uuid; not for factory"},
            "files": {
                "type": "object",
                "additionalProperties": _STR,
                "description": "File name to its value (clear text; encrypted per device)",
                "examples": [{"motd": "hello"}],
            },
            "unencrypted": {"type": "boolean", "description": "Serve the values in clear"},
            "on_changed": {
                "type": "array",
                "items": _STR,
                "description": "Command the device runs when a file changes, one argument each",
            },
            "reason": {**REASON, "description": "Kept in the config log"},
            "factory": {**_STR, "description": "Needed only when the store holds several"},
        },
    },
    "ConfigSet": _object(
        factory=_STR,
        scope=_STR,
        key=_STR,
        files={"type": "array", "items": _STR},
        encrypted_to={**_OPT_STR, "description": "sha256 of the device key values went to"},
    ),
    "ConfigChange": _CONFIG_CHANGE,
    "GroupMoveRequest": {
        "type": "object",
        "required": ["group", "reason"],
        "additionalProperties": False,
        "properties": {
            "group": {**_STR, "description": "The new group; empty for none"},
            "reason": REASON,
        },
    },
    "GroupMoved": _object(
        moved={"type": "boolean", "description": "false: it was in that group already"},
        change={"oneOf": [_CONFIG_CHANGE, {"type": "null"}]},
    ),
    "Unlocked": _object(
        uuid=_STR,
        unlocked={"type": "boolean", "description": "false: no next key was announced"},
        withdrawn_pubkey_sha256={**_OPT_STR, "description": "sha256 of the withdrawn key"},
    ),
    "Campaign": _CAMPAIGN,
    "CampaignCreateRequest": _CAMPAIGN_CREATE,
    "CampaignPlan": _CAMPAIGN_PLAN,
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
