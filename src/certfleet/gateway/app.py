"""The device gateway's HTTP front-end on aiohttp: routes, bodies, headers and status codes.

Decisions live in `service.py`; this module only turns HTTP into calls there
and answers. The listener asks for client certificates without requiring
them (so that registration works without one); every route here refuses a
request without a verified client certificate with 401. Every refusal is a
one-line text/plain body with an `X-Certfleet-Error` code, logged at INFO.
Every answer names the worker process that gave it in `X-Certfleet-Worker`.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from aiohttp import hdrs, web
from aiohttp.helpers import parse_http_date
from cryptography import x509

from certfleet.refusals import framework_refusal, log_fault, log_refusal, method_not_allowed

from . import wire
from .config import http_date
from .errors import GatewayError, no_client_cert, too_large
from .peer import client_cert
from .service import ConfigAnswer, GatewayService

log = logging.getLogger(__name__)

REQUEST_ID = web.RequestKey("gateway_request_id", str)
SERVICE = web.AppKey("gateway_service", GatewayService)
WORKER_HEADER = "X-Certfleet-Worker"
ERROR_HEADER = "X-Certfleet-Error"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_dumps = partial(json.dumps, separators=(",", ":"), ensure_ascii=False)


def make_gateway_app(
    service: GatewayService, *, extra_routes: list[web.RouteDef] | None = None
) -> web.Application:
    """The device gateway application, to serve at / of the gateway listener.

    `extra_routes` (e.g. online registration) are served by the same app and
    get the same error handling; they do their own authentication. The app
    starts and stops the service's background work (deny-list refresh) with
    itself, and keeps the service at `app[SERVICE]` for them.
    """
    app = web.Application(client_max_size=service.policy.max_body_bytes, middlewares=[_answers])
    app[SERVICE] = service
    handlers = _Handlers(service)
    app.add_routes(
        [
            web.get("/device", handlers.get_device),
            web.patch("/device", handlers.patch_device),
            web.delete("/device/next-key", handlers.delete_next_key),
            web.get("/config", handlers.get_config),
            web.patch("/config", handlers.patch_config),
            web.get("/config-device", handlers.get_config_device),
            web.post("/config/applied", handlers.config_applied),
            web.post("/events", handlers.post_events),
        ]
    )
    if extra_routes:
        app.add_routes(extra_routes)
    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)
    return app


async def _start(app: web.Application) -> None:
    await app[SERVICE].start()


async def _stop(app: web.Application) -> None:
    await app[SERVICE].close()


class _Handlers:
    def __init__(self, service: GatewayService) -> None:
        self.service = service

    async def get_device(self, request: web.Request) -> web.Response:
        return _json(await self.service.device(_cert(request)))

    async def patch_device(self, request: web.Request) -> web.Response:
        cert = _cert(request)
        return _json(await self.service.announce_next_key(cert, await self._body(request)))

    async def delete_next_key(self, request: web.Request) -> web.Response:
        cert = _cert(request)
        wanted = wire.withdrawn_key(request.query.get("sha256"))
        return _json(await self.service.withdraw_next_key(cert, wanted))

    async def get_config(self, request: web.Request) -> web.Response:
        cert = _cert(request)
        since = _http_date_value(request.headers.get(hdrs.IF_MODIFIED_SINCE))
        return _config(await self.service.config(cert, since))

    async def get_config_device(self, request: web.Request) -> web.Response:
        return _config(await self.service.device_config(_cert(request)))

    async def patch_config(self, request: web.Request) -> web.Response:
        cert = _cert(request)
        return _json(await self.service.upload_device_config(cert, await self._body(request)))

    async def config_applied(self, request: web.Request) -> web.Response:
        cert = _cert(request)
        return _json(await self.service.config_applied(cert, await self._body(request)))

    async def post_events(self, request: web.Request) -> web.Response:
        cert = _cert(request)
        return _json(await self.service.post_events(cert, await self._body(request)))

    async def _body(self, request: web.Request) -> bytes:
        limit = self.service.policy.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise _too_large(f"request body of {length} bytes", limit)
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge as exc:  # chunked bodies have no Content-Length
            raise _too_large("chunked request body", limit) from exc


def _cert(request: web.Request) -> x509.Certificate:
    cert = client_cert(request)
    if cert is None:
        raise no_client_cert()
    return cert


@functools.lru_cache(maxsize=4096)
def _http_date_value(header: str | None) -> dt.datetime | None:
    # A device sends the same If-Modified-Since until its config changes: parse it once.
    return parse_http_date(header)


def _too_large(what: str, limit: int) -> GatewayError:
    return too_large("too-large", f"{what} is over this gateway's limit of {limit} bytes")


def _json(data: Any) -> web.Response:
    return web.json_response(data, dumps=_dumps)


def _config(answer: ConfigAnswer) -> web.Response:
    headers = {}
    if answer.last_modified is not None:
        headers[hdrs.LAST_MODIFIED] = http_date(answer.last_modified)
    if answer.files is None:
        return web.Response(status=304, headers=headers)
    response = _json(answer.files)
    response.headers.update(headers)
    # Values are encrypted per device, but names and clear values are not for shared caches.
    response.headers[hdrs.CACHE_CONTROL] = "private, no-cache"
    return response


@web.middleware
async def _answers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every refusal into one logged line of text; 500 only for real faults."""
    request[REQUEST_ID] = secrets.token_hex(16)
    try:
        response = await handler(request)
    except GatewayError as exc:
        response = _refusal(request, exc)
    except web.HTTPException as exc:
        if exc.status < 400:  # a redirect or the like from an extra route
            raise
        response = _refusal(request, _from_http(request, exc))
    except Exception:
        response = _text(500, log_fault(log, "gateway", request, request[REQUEST_ID]))
    response.headers["X-Request-ID"] = request[REQUEST_ID]
    response.headers[WORKER_HEADER] = str(os.getpid())
    return response


def _refusal(request: web.Request, exc: GatewayError) -> web.Response:
    cert = client_cert(request)
    who = f", cert serial {cert.serial_number:x}" if cert is not None else ""
    log_refusal(log, "gateway", request, exc, who, request[REQUEST_ID])
    response = _text(exc.status, exc.message)
    response.headers.update(exc.headers)
    response.headers[ERROR_HEADER] = exc.code
    return response


def _text(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message + "\n")


def _from_http(request: web.Request, exc: web.HTTPException) -> GatewayError:
    """Routing and framework refusals, reworded so a person knows what to change."""
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return method_not_allowed(GatewayError, request, exc, request.path)
    if isinstance(exc, web.HTTPNotFound):
        paths = sorted(
            {r.canonical for r in request.app.router.resources() if r.canonical.startswith("/")}
        )
        return GatewayError(
            404,
            "not-found",
            f"{request.path} is not a gateway path (paths: {', '.join(paths)})",
        )
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return GatewayError(413, "too-large", "request body is larger than this gateway's limit")
    return framework_refusal(GatewayError, exc)
