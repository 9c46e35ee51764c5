"""Routes described once: the app registers them and the OpenAPI document is built from them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Param:
    """A query parameter."""

    name: str
    description: str
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "string"})


@dataclass(frozen=True)
class Endpoint:
    """One route with what its OpenAPI entry says about it."""

    method: str
    path: str
    handler: Handler
    # None: no token needed.
    scope: str | None
    summary: str
    response: dict[str, Any]
    query: tuple[Param, ...] = ()
    body: dict[str, Any] | None = None
    # Client errors the route may answer besides 401/403.
    errors: tuple[int, ...] = (400,)
    # Success answers other than 200 (e.g. 201), by status, with their schema.
    answers: dict[int, dict[str, Any]] = field(default_factory=dict)
    # Media type of the success answers (e.g. text/plain for /metrics).
    media_type: str = "application/json"

    def route(self) -> web.RouteDef:
        """The aiohttp route (no automatic HEAD: the document lists what is served)."""
        if self.method == "GET":
            return web.get(self.path, self.handler, allow_head=False)
        return web.route(self.method, self.path, self.handler)

    @property
    def param_names(self) -> tuple[str, ...]:
        """Names of the query parameters."""
        return tuple(param.name for param in self.query)
