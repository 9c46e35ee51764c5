"""Admin API routes of rotation campaigns; thin over certfleet.fleet.campaigns.

GET /v1/campaigns, GET /v1/campaigns/{id} need the scope `read`; creating
and changing campaigns need `rotate`.
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

from . import params
from .auth import READ, ROTATE, requires
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


@requires(READ)
async def list_campaigns(request: web.Request) -> web.Response:
    """GET /v1/campaigns?limit=N: newest first."""
    query = params.query(request, ("limit",))
    limit = params.integer("limit", query.get("limit"), 50, 1, 1000)
    found = await fleet.list_campaigns(request.app[STORE], limit=limit)
    return _json({"items": [view.as_dict() for view in found], "next": None})


@requires(READ)
async def show_campaign(request: web.Request) -> web.Response:
    """GET /v1/campaigns/{id}?devices=N: counts per state and the first N devices."""
    query = params.query(request, ("devices",))
    devices = params.integer("devices", query.get("devices"), 0, 0, 10000)
    view = await fleet.show_campaign(request.app[STORE], _id(request), devices=devices)
    return _json(view.as_dict())


@requires(ROTATE)
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


@requires(ROTATE)
async def change_campaign(request: web.Request) -> web.Response:
    """POST /v1/campaigns/{id}/{pause|resume|abort|retry-failed}."""
    params.query(request, ())
    action = ACTIONS.get(request.match_info["action"])
    if action is None:
        raise web.HTTPNotFound()
    view = await action(request.app[STORE], _id(request), actor=request[CALLER].actor)
    return _json(view.as_dict())


def campaign_routes() -> list[web.RouteDef]:
    """The campaign routes, for the admin API app."""
    return [
        web.get("/v1/campaigns", list_campaigns, allow_head=False),
        web.post("/v1/campaigns", create_campaign),
        web.get("/v1/campaigns/{id}", show_campaign, allow_head=False),
        web.post("/v1/campaigns/{id}/{action}", change_campaign),
    ]


def _id(request: web.Request) -> int:
    text = request.match_info["id"]
    if not text.isdigit():
        raise bad_request(f"campaign id {text!r} must be a whole number")
    return int(text)


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
