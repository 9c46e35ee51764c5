"""Admin API routes of rotation campaigns; thin over certfleet.fleet.campaigns.

GET /v1/campaigns, GET /v1/campaigns/{id} need the scope `read`; creating
and changing campaigns need `rotate`. Declared as `Endpoint`s, so the
OpenAPI document has their parameters and schemas.
"""

from __future__ import annotations

import datetime as dt
import json
from functools import partial
from typing import Any

from aiohttp import web

from certfleet.fleet import campaigns as fleet
from certfleet.fleet.campaigns import CampaignSettings, Selector
from certfleet.fleet.rotate_certs import make_order

from . import params, schemas
from .auth import READ, ROTATE
from .endpoints import Endpoint, Handler, Param
from .errors import bad_request
from .keys import CALLER, STORE

_dumps = partial(json.dumps, separators=(",", ":"), ensure_ascii=False)
DEFAULTS = CampaignSettings()
# Body fields of POST /v1/campaigns and the JSON types they take.
CREATE_FIELDS: dict[str, tuple[type, ...]] = {
    "group": (str,),
    "all": (bool,),
    "reissue_from_ca": (str,),
    "to_ca": (str,),
    "reason": (str,),
    "est_server": (str,),
    "hsm_pkey_ids": (str,),
    "hsm_cert_ids": (str,),
    "canary_share": (int, float),
    "rate_per_minute": (int,),
    "failure_threshold": (int, float),
    "canary_deadline": (str,),
    "device_deadline": (str,),
    "offline_after": (str,),
    "dryrun": (bool,),
}
ACTIONS = {
    "pause": fleet.pause,
    "resume": fleet.resume,
    "abort": fleet.abort,
    "retry-failed": fleet.retry_failed,
}


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=_dumps)


async def list_campaigns(request: web.Request) -> web.Response:
    """GET /v1/campaigns?limit=N: newest first."""
    query = params.query(request, ("limit",))
    limit = params.integer("limit", query.get("limit"), 50, 1, 1000)
    found = await fleet.list_campaigns(request.app[STORE], limit=limit)
    return _json({"items": [view.as_dict() for view in found], "next": None})


async def show_campaign(request: web.Request) -> web.Response:
    """GET /v1/campaigns/{id}?devices=N: counts per state and the first N devices."""
    query = params.query(request, ("devices",))
    devices = params.integer("devices", query.get("devices"), 0, 0, 10000)
    view = await fleet.show_campaign(request.app[STORE], _id(request), devices=devices)
    return _json(view.as_dict())


async def create_campaign(request: web.Request) -> web.Response:
    """POST /v1/campaigns: 201 with the campaign, or 200 with the plan for "dryrun": true."""
    params.query(request, ())
    body = await _create_body(request)
    selector = Selector(
        body.get("group"), body.get("all", False), body.get("reissue_from_ca"), body.get("to_ca")
    )
    plan = await fleet.create_campaign(
        request.app[STORE],
        selector,
        _settings(body),
        make_order(body.get("est_server"), body.get("hsm_pkey_ids"), body.get("hsm_cert_ids")),
        reason=body.get("reason", ""),
        actor=request[CALLER].actor,
        dryrun=body.get("dryrun", False),
    )
    if plan.campaign is None:
        return _json(
            {
                "dryrun": True,
                "devices": plan.devices,
                "canaries": plan.canaries,
                "left_out": plan.left_out,
                "value": plan.order.value(),
            }
        )
    return _json(plan.campaign.as_dict(), status=201)


def _change(action: str) -> Handler:
    """The handler of POST /v1/campaigns/{id}/<action>."""
    change = ACTIONS[action]

    async def handler(request: web.Request) -> web.Response:
        params.query(request, ())
        view = await change(request.app[STORE], _id(request), actor=request[CALLER].actor)
        return _json(view.as_dict())

    # A name per action: it is the operation's id in the OpenAPI document.
    handler.__name__ = handler.__qualname__ = f"{action.replace('-', '_')}_campaign"
    handler.__doc__ = f"POST /v1/campaigns/{{id}}/{action}."
    return handler


_ACTION_SUMMARIES = {
    "pause": "Pause a running campaign: nobody new is triggered, triggered devices are watched",
    "resume": "Resume a paused campaign",
    "abort": "Abort a campaign for good: pending devices are never triggered",
    "retry-failed": "Put the failed devices back to pending under a new rotation id; "
    "the campaign runs again",
}


def campaign_endpoints() -> list[Endpoint]:
    """The campaign routes, for the admin API app and its OpenAPI document."""
    one = "/v1/campaigns/{id}"
    return [
        Endpoint(
            "GET",
            "/v1/campaigns",
            list_campaigns,
            READ,
            "Rotation campaigns, newest first, in one page",
            schemas.page("Campaign"),
            query=(
                Param(
                    "limit",
                    "How many, 1 to 1000 (default 50)",
                    {"type": "integer", "minimum": 1, "maximum": 1000},
                ),
            ),
        ),
        Endpoint(
            "POST",
            "/v1/campaigns",
            create_campaign,
            ROTATE,
            "Create a campaign (201 with it), or with dryrun plan one (200 with the plan)",
            schemas.ref("CampaignPlan"),
            body=schemas.ref("CampaignCreateRequest"),
            errors=(400, 404, 409, 413),
            answers={201: schemas.ref("Campaign")},
        ),
        Endpoint(
            "GET",
            one,
            show_campaign,
            READ,
            "One campaign, its counts per state and its first N devices",
            schemas.ref("Campaign"),
            query=(
                Param(
                    "devices",
                    "How many of its devices to list, 0 to 10000 (default 0)",
                    {"type": "integer", "minimum": 0, "maximum": 10000},
                ),
            ),
            errors=(400, 404),
        ),
        *(
            Endpoint(
                "POST",
                f"{one}/{action}",
                _change(action),
                ROTATE,
                _ACTION_SUMMARIES[action],
                schemas.ref("Campaign"),
                errors=(400, 404, 409),
            )
            for action in ACTIONS
        ),
    ]


def _id(request: web.Request) -> int:
    return params.record_id("campaign id", request.match_info["id"])


async def _create_body(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read())
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad_request('the body must be a JSON object like {"group": "lab", ...}') from exc
    if not isinstance(body, dict):
        raise bad_request('the body must be a JSON object like {"group": "lab", ...}')
    for name, value in body.items():
        kinds = CREATE_FIELDS.get(name)
        if kinds is None:
            raise bad_request(f"unknown field {name!r}; known: {', '.join(CREATE_FIELDS)}")
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise bad_request(f"field {name!r} must be {' or '.join(k.__name__ for k in kinds)}")
    return body


def _settings(body: dict[str, Any]) -> CampaignSettings:
    def duration(name: str, default: dt.timedelta) -> dt.timedelta:
        text = body.get(name)
        return params.parse_duration(name, text) if text is not None else default

    return CampaignSettings(
        canary_share=float(body.get("canary_share", DEFAULTS.canary_share)),
        rate_per_minute=body.get("rate_per_minute", DEFAULTS.rate_per_minute),
        failure_threshold=float(body.get("failure_threshold", DEFAULTS.failure_threshold)),
        canary_deadline=duration("canary_deadline", DEFAULTS.canary_deadline),
        device_deadline=duration("device_deadline", DEFAULTS.device_deadline),
        offline_after=duration("offline_after", DEFAULTS.offline_after),
    )
