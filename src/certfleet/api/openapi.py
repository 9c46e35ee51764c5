"""The OpenAPI 3.1 document of the admin API, built from the routes the app really has.

Routes described by an `Endpoint` get their parameters and schemas; extra
routes (added with `make_api_app(extra_routes=...)`) get an entry from their
handler's docstring and scope, so the document never misses a route.
"""

from __future__ import annotations

import inspect
import re
from http import HTTPStatus
from typing import Any

from aiohttp import web

from certfleet import __version__

from . import schemas
from .auth import SCOPE_ATTRIBUTE, default_scope
from .endpoints import Endpoint

_PATH_PARAM = re.compile(r"\{([^}:]+)[^}]*\}")
_REASONS = {
    400: "Bad input; the message says what to change",
    401: "No token, or an unknown, expired or revoked one",
    403: "The token lacks the scope",
    404: "No such object",
    405: "Method not allowed on this path",
    409: "Conflicts with the object's state",
    413: "Body too large",
}


def build_document(
    app: web.Application, endpoints: list[Endpoint], public: tuple[str, ...] = ("/openapi.json",)
) -> dict[str, Any]:
    """The document for every route of ``app``; ``public`` paths need no token."""
    described = {(e.method, e.path): e for e in endpoints}
    paths: dict[str, dict[str, Any]] = {}
    for route in app.router.routes():
        path = route.resource.canonical if route.resource else ""
        if not path.startswith("/") or route.method == "*":
            continue
        endpoint = described.get((route.method, path))
        if endpoint:
            operation = _described(endpoint)
        else:
            operation = _extra(route, secured=path not in public)
        parameters = _path_params(path) + operation.pop("query_parameters", [])
        if parameters:
            operation["parameters"] = parameters
        paths.setdefault(path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "certfleet admin API",
            "version": __version__,
            "description": "Operator API of certfleet. Send 'Authorization: Bearer <token>' "
            "(certfleet tokens create --scope read|rotate|pki-admin); pki-admin includes "
            "rotate, which includes read.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas.COMPONENTS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {
                str(code): {
                    "description": text,
                    "content": {"application/json": {"schema": schemas.ref("Error")}},
                }
                for code, text in _REASONS.items()
            },
        },
    }


def _path_params(path: str) -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": schemas.PATH_PARAMS.get(name, {"type": "string"}),
        }
        for name in _PATH_PARAM.findall(path)
    ]


def _errors(codes: tuple[int, ...], secured: bool) -> dict[str, Any]:
    codes = codes + ((401, 403) if secured else ())
    return {str(code): {"$ref": f"#/components/responses/{code}"} for code in sorted(set(codes))}


def _described(endpoint: Endpoint) -> dict[str, Any]:
    secured = endpoint.scope is not None
    operation: dict[str, Any] = {
        "operationId": endpoint.handler.__name__,
        "summary": endpoint.summary,
        "responses": {
            str(status): {
                "description": HTTPStatus(status).phrase,
                "content": {endpoint.media_type: {"schema": schema}},
            }
            for status, schema in {200: endpoint.response, **endpoint.answers}.items()
        }
        | _errors(endpoint.errors, secured),
        "query_parameters": [
            {
                "name": p.name,
                "in": "query",
                "required": False,
                "description": p.description,
                "schema": p.schema,
            }
            for p in endpoint.query
        ],
    }
    if secured:
        operation["security"] = [{"bearer": []}]
        operation["x-certfleet-scope"] = endpoint.scope
    if endpoint.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": endpoint.body}},
        }
    return operation


def _extra(route: web.AbstractRoute, *, secured: bool) -> dict[str, Any]:
    handler = route.handler
    doc = inspect.getdoc(handler) or f"{route.method} {route.resource.canonical}"
    operation: dict[str, Any] = {
        "operationId": f"{getattr(handler, '__name__', 'handler')}_{route.method.lower()}",
        "summary": doc.splitlines()[0],
        "responses": {
            "200": {"description": "OK", "content": {"application/json": {"schema": {}}}},
            **_errors((400, 404), secured),
        },
    }
    if secured:
        scope = getattr(handler, SCOPE_ATTRIBUTE, None) or default_scope(route.method)
        operation["security"] = [{"bearer": []}]
        operation["x-certfleet-scope"] = scope
    return operation
