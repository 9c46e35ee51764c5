"""The admin API on aiohttp: JSON in and out, bearer tokens with scopes, one-line refusals.

Every answer carries `X-Request-ID` (the client's, if it sent a sane one) and
`X-Certfleet-Worker`; every refusal is JSON `{"error", "message",
"request_id"}` with a 4xx status, is logged at INFO, and changes nothing.
Tokens are never logged: refusals name the token's id and name at most.
Paths under /dashboard are the HTML dashboard (`dashboard.py`): its own
router and cookie sign-in, and its refusals are HTML pages.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

from aiohttp import web

from certfleet.refusals import framework_refusal, log_fault, log_refusal, method_not_allowed
from certfleet.storable_text import unstorable_pairs
from certfleet.store.engine import Store, open_store
from certfleet.store.errors import NotFoundError, StoreError

from . import auth, dashboard
from .campaign_routes import campaign_endpoints
from .config_routes import config_endpoints
from .device_routes import device_endpoints
from .endpoints import Endpoint
from .errors import ApiError, api_wording, bad_request, conflict, not_found, too_large
from .keys import CALLER, REQUEST_ID, STORE
from .metrics import metrics_endpoints
from .openapi import build_document

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 64 * 1024
OPENAPI_PATH = "/openapi.json"
WORKER_HEADER = "X-Certfleet-Worker"
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_ENDPOINTS = web.AppKey("api_endpoints", list)
_OWNED_STORE_URL = web.AppKey("api_store_url", str)
_MAX_BODY = web.AppKey("api_max_body_bytes", int)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_dumps = partial(json.dumps, separators=(",", ":"), ensure_ascii=False)


def make_api_app(
    store: Store | str,
    *,
    extra_routes: list[web.RouteDef] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> web.Application:
    """The admin API, to serve at / of its listener.

    Given a URL the app opens the store on startup and closes it on cleanup;
    given a Store it uses it and leaves closing to the caller. `extra_routes`
    are served with the same authentication and errors; mark their handlers
    with `auth.requires(scope)` (unmarked: GET needs read, the rest pki-admin).
    The device, campaign, config and /metrics routes are always served.
    """
    app = web.Application(client_max_size=max_body_bytes, middlewares=[_answers])
    app[_MAX_BODY] = max_body_bytes
    if isinstance(store, Store):
        app[STORE] = store
    else:
        app[_OWNED_STORE_URL] = store
        app.cleanup_ctx.append(_own_store)
    endpoints = device_endpoints() + campaign_endpoints() + config_endpoints() + metrics_endpoints()
    app[_ENDPOINTS] = endpoints
    app.add_routes([e.route() for e in endpoints])
    app.add_routes(extra_routes or [])
    app.router.add_get(OPENAPI_PATH, _openapi, allow_head=False)
    return app


async def _own_store(app: web.Application) -> AsyncIterator[None]:
    app[STORE] = await open_store(app[_OWNED_STORE_URL])
    yield
    await app[STORE].close()


async def _openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of this API (no token needed)."""
    document = build_document(request.app, request.app[_ENDPOINTS], public=(OPENAPI_PATH,))
    return web.json_response(document, dumps=_dumps)


def _scope(request: web.Request) -> str | None:
    """The scope the matched route needs; None for the public document."""
    route = request.match_info.route
    if route.resource is not None and route.resource.canonical == OPENAPI_PATH:
        return None
    for endpoint in request.app[_ENDPOINTS]:
        if endpoint.handler is route.handler:
            return endpoint.scope
    return getattr(route.handler, auth.SCOPE_ATTRIBUTE, None) or auth.default_scope(request.method)


async def _authorize(request: web.Request) -> str | None:
    """The request's token once it may go on; None for routes that need none."""
    if request.match_info.http_exception is not None:
        raise request.match_info.http_exception
    scope = _scope(request)
    if scope is None:
        return None
    token = auth.bearer_token(request)
    caller = await auth.authenticate(request.app[STORE], token)
    request[CALLER] = caller
    auth.check_scope(caller, scope, f"{request.method} {request.path}")
    return token


def _check_body_size(request: web.Request) -> None:
    limit = request.app[_MAX_BODY]
    length = request.content_length
    if length is not None and length > limit:
        raise too_large(f"request body of {length} bytes is over this API's limit of {limit}")


def _check_url_text(request: web.Request) -> None:
    """400 for a path or query value the store could not hold (a %00, say)."""
    problem = unstorable_pairs([*request.match_info.items(), *request.query.items()])
    if problem:
        raise bad_request(f"the URL has {problem}")


@web.middleware
async def _answers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate, then turn every refusal into logged one-line JSON; 500 only for faults."""
    request[REQUEST_ID] = _request_id(request)
    try:
        _check_body_size(request)
        _check_url_text(request)
        if dashboard.owns(request.path):
            # HTML pages with their own router and cookie sign-in; not API routes.
            response = await dashboard.dispatch(request)
        else:
            token = await _authorize(request)
            response = await handler(request)
            if token is not None:
                await auth.record_use(request.app[STORE], token)
    except web.HTTPException as exc:
        if exc.status < 400:  # a redirect or the like from an extra route
            raise
        response = _answer_error(request, exc)
    except Exception as exc:  # every error becomes an answer; _answer_error logs real faults
        response = _answer_error(request, exc)
    response.headers["X-Request-ID"] = request[REQUEST_ID]
    response.headers[WORKER_HEADER] = str(os.getpid())
    return response


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-ID", "")
    return given if _CLIENT_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def _answer_error(request: web.Request, exc: Exception) -> web.StreamResponse:
    error = _as_api_error(request, exc)
    if error is None:
        error = ApiError(500, "internal", log_fault(log, "api", request, request[REQUEST_ID]))
    else:
        caller = request.get(CALLER)
        who = f", token {caller.token_id} '{caller.name}'" if caller else ""
        log_refusal(log, "api", request, error, who, request[REQUEST_ID])
    if dashboard.owns(request.path):
        response = dashboard.error_page(request, error)
    else:
        body = {"error": error.code, "message": error.message, "request_id": request[REQUEST_ID]}
        response = web.json_response(body, status=error.status, dumps=_dumps)
    response.headers.update(error.headers)
    return response


def _as_api_error(request: web.Request, exc: Exception) -> ApiError | None:
    """The API error for a refusal; None for a real fault."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, NotFoundError):
        return not_found(api_wording(str(exc)))
    if isinstance(exc, StoreError):
        # Store and fleet errors that clash with an object's state say so with `status`.
        if getattr(exc, "status", None) == 409:
            return conflict(api_wording(str(exc)))
        return bad_request(api_wording(str(exc)))
    if isinstance(exc, web.HTTPException) and exc.status >= 400:
        return _from_http(request, exc)
    return None


def _from_http(request: web.Request, exc: web.HTTPException) -> ApiError:
    """Routing and framework refusals, reworded so a person knows what to change."""
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return method_not_allowed(ApiError, request, exc, request.path)
    if isinstance(exc, web.HTTPNotFound):
        return not_found(f"{request.path} is not an API path; see {OPENAPI_PATH} for the paths")
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = request.app[_MAX_BODY]
        return too_large(f"request body is over this API's limit of {limit} bytes")
    return framework_refusal(ApiError, exc)


__all__ = ["Endpoint", "make_api_app"]
