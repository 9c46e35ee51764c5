"""The read-only operator dashboard: server-rendered HTML pages under /dashboard.

The pages are not API routes: they live in their own router (so /openapi.json
does not list them), sign in with a cookie (`dashboard_auth`) instead of a
bearer token, and answer refusals as HTML. The admin API's middleware hands
every /dashboard request to `dispatch` and every refusal to `error_page`.
Everything shown comes from `certfleet.fleet`; nothing here changes the store.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import jinja2
from aiohttp import web

from certfleet.fleet import campaigns, device_views, expiry_report
from certfleet.fleet.campaigns import CampaignView
from certfleet.refusals import log_refusal
from certfleet.store.engine import Store
from certfleet.store.schema import CampaignDeviceState, CampaignStatus

from . import auth, dashboard_auth, device_routes, params
from .errors import ApiError, not_found
from .keys import CALLER, REQUEST_ID, STORE

log = logging.getLogger(__name__)

PREFIX = dashboard_auth.PREFIX
REFRESH_SECONDS = 15
UPDATES_PAGE = 50
CAMPAIGN_DEVICES = 1000
OPEN_CAMPAIGNS = (CampaignStatus.RUNNING, CampaignStatus.PAUSED)
# The pages load nothing but themselves and post forms only to themselves.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # same-origin, not no-referrer: with no-referrer browsers post forms with Origin: null.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_MATCH = web.RequestKey("dashboard_match", dict)


def owns(path: str) -> bool:
    """True for the paths the dashboard serves (and answers errors for)."""
    return path == PREFIX or path.startswith(PREFIX + "/")


# -- rendering ------------------------------------------------------------------------------


def _when(text: str | None) -> str:
    """An RFC 3339 time as '2026-11-24 05:59:13 UTC'; a dash for none."""
    if not text:
        return "—"
    try:
        moment = dt.datetime.fromisoformat(text).astimezone(dt.UTC)
    except ValueError:
        return text
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _days(days: int | None) -> str:
    if days is None:
        return "—"
    if days < 0:
        # days_left is floored: -1 means expired within the last day.
        ago = -days - 1
        return f"expired {ago} d ago" if ago else "expired today"
    return f"in {days} d"


def _part(text: Any) -> str:
    """One path segment, percent-encoded (correlation ids come from devices)."""
    return urllib.parse.quote(str(text), safe="")


_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("certfleet.api", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)
_ENV.filters.update(when=_when, days=_days, part=_part, compact=json.dumps)


def _html(text: str, status: int = 200) -> web.Response:
    response = web.Response(text=text, status=status, content_type="text/html", charset="utf-8")
    response.headers.update(HEADERS)
    return response


def _page(
    request: web.Request,
    template: str,
    status: int = 200,
    *,
    signed_in: bool = True,
    **context: Any,
) -> web.Response:
    text = _ENV.get_template(template).render(
        # The caller names the token in the header; a refused sign-in has none to name.
        caller=request.get(CALLER) if signed_in else None,
        refresh=context.pop("refresh", None),
        generated=_when(dt.datetime.now(dt.UTC).isoformat()),
        request_id=request.get(REQUEST_ID, ""),
        **context,
    )
    return _html(text, status)


def error_page(request: web.Request, error: ApiError) -> web.Response:
    """A refusal as an HTML page with its status and one-line reason (the login form for
    a refused sign-in)."""
    if request.path == dashboard_auth.LOGIN and request.method == "POST":
        return _page(request, "login.html", error.status, signed_in=False, reason=error.message)
    return _page(request, "error.html", error.status, error=error)


# -- dispatch -------------------------------------------------------------------------------


async def dispatch(request: web.Request) -> web.StreamResponse:
    """Serve a /dashboard request: route it, check the session cookie, run the page."""
    match = await _ROUTER.resolve(request)
    if isinstance(match.http_exception, web.HTTPNotFound):
        raise not_found(f"{request.path} is not a dashboard page; start at {PREFIX}")
    if match.http_exception is not None:
        raise match.http_exception
    request[_MATCH] = dict(match)
    if match.handler in _PUBLIC:
        return await match.handler(request)
    try:
        token = dashboard_auth.session_token(request)
        await dashboard_auth.authorize(request, token)
    except ApiError as refusal:
        caller = request.get(CALLER)
        who = f", token {caller.token_id} '{caller.name}'" if caller else ""
        log_refusal(log, "dashboard", request, refusal, who, request[REQUEST_ID])
        return dashboard_auth.to_login(request, refusal.message)
    response = await match.handler(request)
    await auth.record_use(request.app[STORE], token)
    return response


# -- sign-in --------------------------------------------------------------------------------


async def login_form(request: web.Request) -> web.Response:
    """GET /dashboard/login: the token form, with why the last page sent the operator here."""
    params.query(request, ())
    response = _page(request, "login.html", reason=dashboard_auth.login_reason(request))
    dashboard_auth.forget_reason(request, response)
    return response


async def login(request: web.Request) -> web.Response:
    """POST /dashboard/login: check the token, set the session cookie, go to the overview."""
    params.query(request, ())
    token = await dashboard_auth.form_token(request)
    await dashboard_auth.authorize(request, token)
    await auth.record_use(request.app[STORE], token)
    return dashboard_auth.signed_in(request, token)


async def logout(request: web.Request) -> web.Response:
    """POST /dashboard/logout: clear the session cookie (the token itself stays valid)."""
    params.query(request, ())
    dashboard_auth.check_origin(request)
    return dashboard_auth.signed_out(request)


# -- pages ----------------------------------------------------------------------------------


async def overview(request: web.Request) -> web.Response:
    """GET /dashboard: device counts, expiry headlines, open campaigns."""
    params.query(request, ())
    store = request.app[STORE]
    report = await expiry_report.expiry_report(store)
    found = await campaigns.list_campaigns(store, limit=50)
    return _page(
        request,
        "overview.html",
        refresh=REFRESH_SECONDS,
        counts=await _status_counts(store),
        expiry=_headlines(report),
        campaigns=[_campaign(view) for view in found if view.status in OPEN_CAMPAIGNS],
    )


async def _status_counts(store: Store) -> dict[str, int]:
    """Devices per status, the usual ones first."""
    counts = await device_views.count_by_status(store)
    # STATUSES runs from the state that wins (deleted) to active.
    return {status: counts[status] for status in reversed(device_views.STATUSES)}


def _headlines(report: dict[str, Any]) -> dict[str, Any]:
    devices, cas = report["device_certs"], report["ca_certs"]
    within_30 = devices["week"] + devices["month"]
    return {
        "expired": devices["expired"],
        "within_30": within_30,
        "within_90": within_30 + devices["quarter"],
        "not_seen": report["will_miss_renewal"],
        "cas_expired": cas["expired"],
        "cas_within_90": cas["week"] + cas["month"] + cas["quarter"],
        "cas_outlived": report["cas_expiring_before_their_certs"],
        "generated_at": report["generated_at"],
    }


def _campaign(view: CampaignView) -> dict[str, Any]:
    """A campaign's fields plus its progress: segments of a bar, in per cent."""
    counts, total = view.counts, view.total
    state = CampaignDeviceState
    parts = {
        "completed": counts[state.COMPLETED],
        "failed": counts[state.FAILED],
        "skipped": counts[state.SKIPPED_OFFLINE],
        "in flight": counts[state.TRIGGERED] + counts[state.IN_PROGRESS],
        "pending": counts[state.PENDING],
    }
    return {
        **view.as_dict(),
        "parts": parts,
        "percent": {name: 100 * n / total if total else 0 for name, n in parts.items()},
    }


async def devices(request: web.Request) -> web.Response:
    """GET /dashboard/devices: the device table with the filters and paging of /v1/devices."""
    query = _filled(params.query(request, device_routes.LIST_PARAMS))
    page = await device_routes.devices_page(request.app[STORE], query)
    filters = {name: value for name, value in query.items() if name != "cursor"}
    return _page(
        request,
        "devices.html",
        page=page,
        query=query,
        statuses=device_views.STATUSES,
        next_url=_query_string(filters | {"cursor": page.next}) if page.next else None,
        first_url=_query_string(filters) if "cursor" in query else None,
    )


def _query_string(query: dict[str, Any]) -> str:
    return f"?{urllib.parse.urlencode(query)}" if query else ""


def _filled(query: dict[str, str]) -> dict[str, str]:
    """The parameters a person gave: a filter form sends its empty fields too."""
    return {name: value for name, value in query.items() if value.strip()}


def _integer(query: dict[str, str], name: str, default: int, high: int, low: int = 1) -> int:
    return params.integer(name, query.get(name), default, low, high)


async def device(request: web.Request) -> web.Response:
    """GET /dashboard/devices/{uuid}: one device and a page of its updates."""
    query = _filled(params.query(request, ("cursor",)))
    store, uuid = request.app[STORE], request[_MATCH]["uuid"]
    shown = await device_views.show_device(store, uuid)
    updates = await device_views.list_updates(
        store, uuid, limit=UPDATES_PAGE, cursor=query.get("cursor")
    )
    older = urllib.parse.urlencode({"cursor": updates.next}) if updates.next else None
    return _page(request, "device.html", device=shown, updates=updates, older=older)


async def update(request: web.Request) -> web.Response:
    """GET /dashboard/devices/{uuid}/updates/{correlation_id}: one update's events."""
    params.query(request, ())
    match = request[_MATCH]
    uuid = device_views.device_uuid(match["uuid"])
    found = await device_views.update_timeline(request.app[STORE], uuid, match["correlation_id"])
    return _page(request, "update.html", uuid=uuid, update=found)


async def campaign_list(request: web.Request) -> web.Response:
    """GET /dashboard/campaigns: campaigns, newest first, with their progress."""
    query = _filled(params.query(request, ("limit",)))
    found = await campaigns.list_campaigns(
        request.app[STORE], limit=_integer(query, "limit", 50, 1000)
    )
    return _page(
        request,
        "campaigns.html",
        refresh=REFRESH_SECONDS,
        campaigns=[_campaign(view) for view in found],
    )


async def campaign(request: web.Request) -> web.Response:
    """GET /dashboard/campaigns/{id}: one campaign, its settings and per-device states."""
    query = _filled(params.query(request, ("devices",)))
    limit = _integer(query, "devices", CAMPAIGN_DEVICES, 10000, low=0)
    view = await campaigns.show_campaign(request.app[STORE], _campaign_id(request), devices=limit)
    return _page(
        request,
        "campaign.html",
        refresh=REFRESH_SECONDS,
        campaign=_campaign(view),
        devices=view.devices,
        # States in which the device has reported an update with its rotation id.
        reported=(CampaignDeviceState.IN_PROGRESS, CampaignDeviceState.COMPLETED),
    )


def _campaign_id(request: web.Request) -> int:
    return params.record_id("campaign id", request[_MATCH]["id"])


def _router() -> web.UrlDispatcher:
    router = web.UrlDispatcher()
    for path, handler in (
        ("", overview),
        ("/", overview),
        ("/login", login_form),
        ("/devices", devices),
        ("/devices/{uuid}", device),
        ("/devices/{uuid}/updates/{correlation_id}", update),
        ("/campaigns", campaign_list),
        ("/campaigns/{id}", campaign),
    ):
        router.add_get(PREFIX + path, handler, allow_head=False)
    router.add_post(dashboard_auth.LOGIN, login)
    router.add_post(f"{PREFIX}/logout", logout)
    return router


_ROUTER = _router()
# Pages that need no session cookie.
_PUBLIC: frozenset[Handler] = frozenset({login_form, login, logout})
