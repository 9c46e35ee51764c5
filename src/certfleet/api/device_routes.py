"""Routes over devices, their updates, the expiry report and the CAs; thin over `fleet/`."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

from aiohttp import web

from certfleet.fleet import ca_views, denylist_admin, device_views, expiry_report, rotate_certs
from certfleet.store.engine import Store

from . import params, schemas
from .auth import READ, ROTATE
from .endpoints import Endpoint, Param
from .errors import bad_request
from .keys import CALLER, STORE

_dumps = partial(json.dumps, separators=(",", ":"), ensure_ascii=False)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=_dumps)


async def list_devices(request: web.Request) -> web.Response:
    """GET /v1/devices: one page of devices."""
    page = await devices_page(request.app[STORE], params.query(request, LIST_PARAMS))
    return _json(page.as_dict())


async def devices_page(store: Store, query: dict[str, str]) -> device_views.Page:
    """The page of devices that the LIST_PARAMS in `query` ask for (also the dashboard's)."""
    within = query.get("expiring_within")
    return await device_views.list_devices(
        store,
        group=query.get("group"),
        status=query.get("status"),
        expiring_within=params.parse_duration("expiring_within", within) if within else None,
        limit=_limit(query),
        cursor=query.get("cursor"),
    )


async def show_device(request: web.Request) -> web.Response:
    """GET /v1/devices/{uuid}."""
    params.query(request, ())
    return _json(await device_views.show_device(request.app[STORE], request.match_info["uuid"]))


async def delete_device(request: web.Request) -> web.Response:
    """DELETE /v1/devices/{uuid}?reason=...: soft delete, deny-listing its certificates."""
    query = params.query(request, ("reason",))
    deleted = await device_views.delete_device(
        request.app[STORE],
        request.match_info["uuid"],
        actor=request[CALLER].actor,
        reason=query.get("reason", "deleted through the admin API"),
    )
    return _json(deleted)


async def deny_device(request: web.Request) -> web.Response:
    """POST /v1/devices/{uuid}/deny {"reason": ...}."""
    params.query(request, ())
    body = await params.json_object(request, {"reason": str})
    denied = await device_views.deny_device(
        request.app[STORE],
        request.match_info["uuid"],
        actor=request[CALLER].actor,
        reason=body["reason"],
    )
    return _json([entry.as_dict() for entry in denied])


async def rotate_device(request: web.Request) -> web.Response:
    """POST /v1/devices/{uuid}/rotate-certs: set the device's fio-rotate-certs file."""
    params.query(request, ())
    body = await params.json_object(request, {"reason": str}, ROTATE_OPTIONAL)
    order = rotate_certs.make_order(
        body.get("est_server"), body.get("hsm_pkey_ids"), body.get("hsm_cert_ids")
    )
    done = await rotate_certs.rotate_device(
        request.app[STORE],
        request.match_info["uuid"],
        order,
        reason=body["reason"],
        actor=request[CALLER].actor,
        dryrun=body.get("dryrun", False),
    )
    return _json(done.as_dict())


async def deny_certificate(request: web.Request) -> web.Response:
    """POST /v1/denylist {"serial" or "sha256", "reason"}: deny-list one certificate."""
    params.query(request, ())
    body = await params.json_object(request, {"reason": str}, {"serial": str, "sha256": str})
    if ("serial" in body) == ("sha256" in body):
        raise bad_request("give exactly one of the fields 'serial' and 'sha256'")
    denied = await denylist_admin.deny(
        request.app[STORE],
        reason=body["reason"],
        actor=request[CALLER].actor,
        serial=body.get("serial"),
        sha256=body.get("sha256"),
    )
    return _json([entry.as_dict() for entry in denied])


async def list_updates(request: web.Request) -> web.Response:
    """GET /v1/devices/{uuid}/updates: one page of a device's updates."""
    query = params.query(request, ("limit", "cursor"))
    page = await device_views.list_updates(
        request.app[STORE],
        request.match_info["uuid"],
        limit=_limit(query),
        cursor=query.get("cursor"),
    )
    return _json(page.as_dict())


def _limit(query: dict[str, str]) -> int:
    return params.integer(
        "limit", query.get("limit"), device_views.DEFAULT_PAGE, 1, device_views.MAX_PAGE
    )


async def update_timeline(request: web.Request) -> web.Response:
    """GET /v1/devices/{uuid}/updates/{correlation_id}."""
    params.query(request, ())
    info = request.match_info
    found = await device_views.update_timeline(
        request.app[STORE], info["uuid"], info["correlation_id"]
    )
    return _json(found)


async def expiry(request: web.Request) -> web.Response:
    """GET /v1/reports/expiry."""
    query = params.query(request, ("not_seen", "renewal_window"))
    report = await expiry_report.expiry_report(
        request.app[STORE],
        not_seen=_duration(query, "not_seen", expiry_report.DEFAULT_NOT_SEEN),
        renewal_window=_duration(query, "renewal_window", expiry_report.DEFAULT_RENEWAL_WINDOW),
    )
    return _json(report)


def _duration(query: dict[str, str], name: str, default: Any) -> Any:
    return params.parse_duration(name, query[name]) if name in query else default


async def list_cas(request: web.Request) -> web.Response:
    """GET /v1/cas."""
    params.query(request, ())
    return _json({"items": await ca_views.list_all_cas(request.app[STORE]), "next": None})


_STATUS = {"type": "string", "enum": list(device_views.STATUSES)}
_DURATION = {**schemas.DURATION, "examples": ["30d"]}
# The dashboard's filter form sends the field empty when it is not filled in.
_DURATION_OR_EMPTY = {**_DURATION, "pattern": "^$|" + str(_DURATION["pattern"])}
# Optional body fields of POST /v1/devices/{uuid}/rotate-certs besides "reason".
ROTATE_OPTIONAL = {"est_server": str, "hsm_pkey_ids": str, "hsm_cert_ids": str, "dryrun": bool}
LIST_PARAMS = ("group", "status", "expiring_within", "limit", "cursor")
_PAGING = (
    Param(
        "limit",
        f"Page size, 1 to {device_views.MAX_PAGE} (default {device_views.DEFAULT_PAGE})",
        {"type": "integer", "minimum": 1, "maximum": device_views.MAX_PAGE},
    ),
    Param("cursor", "The 'next' value of the previous page"),
)


def device_endpoints() -> list[Endpoint]:
    """Every device, report and CA route."""
    uuid = "/v1/devices/{uuid}"
    return [
        Endpoint(
            "GET",
            "/v1/devices",
            list_devices,
            READ,
            "List devices (not deleted unless status=deleted), in uuid order, one page at a time",
            schemas.page("DeviceSummary"),
            query=(
                Param("group", "Only devices of this group"),
                Param("status", "Only devices in this status", _STATUS),
                Param(
                    "expiring_within",
                    "Only devices whose current certificate expires between now and now + this",
                    _DURATION_OR_EMPTY,
                ),
                *_PAGING,
            ),
        ),
        Endpoint(
            "GET",
            uuid,
            show_device,
            READ,
            "One device (deleted ones too)",
            schemas.ref("DeviceDetail"),
            errors=(400, 404),
        ),
        Endpoint(
            "DELETE",
            uuid,
            delete_device,
            ROTATE,
            "Delete a device: it is refused from now on and its active certificates are "
            "deny-listed; its history stays",
            schemas.ref("DeviceDeleted"),
            query=(
                Param(
                    "reason",
                    "Why; kept with the deny-list entries and the audit log",
                    schemas.REASON,
                ),
            ),
            errors=(400, 404, 409),
        ),
        Endpoint(
            "POST",
            f"{uuid}/deny",
            deny_device,
            ROTATE,
            "Deny-list every active certificate of a device",
            {"type": "array", "items": schemas.ref("Denied")},
            body=schemas.ref("DenyRequest"),
            errors=(400, 404, 409, 413),
        ),
        Endpoint(
            "POST",
            f"{uuid}/rotate-certs",
            rotate_device,
            ROTATE,
            "Make a device renew its key and certificate: set its fio-rotate-certs config "
            "file (or, with dryrun, only show it); refused while it changes its key",
            schemas.ref("RotationTriggered"),
            body=schemas.ref("RotateRequest"),
            errors=(400, 404, 409, 413),
        ),
        Endpoint(
            "POST",
            "/v1/denylist",
            deny_certificate,
            ROTATE,
            "Deny-list one certificate by serial (a stored one) or SHA-256 fingerprint",
            {"type": "array", "items": schemas.ref("Denied")},
            body=schemas.ref("DenyCertificateRequest"),
            errors=(400, 404, 413),
        ),
        Endpoint(
            "GET",
            f"{uuid}/updates",
            list_updates,
            READ,
            "A device's updates, newest first (rotations: certs-<unix time>, auto-<unix time>)",
            schemas.page("UpdateSummary"),
            query=_PAGING,
            errors=(400, 404),
        ),
        Endpoint(
            "GET",
            f"{uuid}/updates/{{correlation_id}}",
            update_timeline,
            READ,
            "One update of a device with its events in the order received",
            schemas.ref("UpdateTimeline"),
            errors=(400, 404),
        ),
        Endpoint(
            "GET",
            "/v1/reports/expiry",
            expiry,
            READ,
            "Certificates expiring per bucket, devices that will miss their renewal, "
            "CAs that expire before certificates they signed",
            schemas.ref("ExpiryReport"),
            query=(
                Param(
                    "not_seen", "A device not seen for this long is stale (default 30d)", _DURATION
                ),
                Param(
                    "renewal_window",
                    "A stale device whose certificate expires within this misses its "
                    "renewal (default 30d)",
                    _DURATION,
                ),
            ),
        ),
        Endpoint(
            "GET",
            "/v1/cas",
            list_cas,
            READ,
            "Every CA and server certificate of the store",
            schemas.page("Ca"),
        ),
    ]
