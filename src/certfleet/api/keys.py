"""What the admin API keeps on its app and on each request."""

from __future__ import annotations

from aiohttp import web

from certfleet.store.engine import Store

from .auth import Caller

STORE = web.AppKey("api_store", Store)
CALLER = web.RequestKey("api_caller", Caller)
REQUEST_ID = web.RequestKey("api_request_id", str)
