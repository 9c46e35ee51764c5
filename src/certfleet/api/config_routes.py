"""Routes over device config files (factory, group and device scope), their log and groups."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

from aiohttp import web

from certfleet.fleet import config_admin
from certfleet.store.config_files import ConfigValue
from certfleet.store.schema import ConfigScope

from . import params, schemas
from .auth import READ, ROTATE
from .endpoints import Endpoint, Param
from .errors import bad_request
from .keys import CALLER, STORE

_dumps = partial(json.dumps, separators=(",", ":"), ensure_ascii=False)
SCOPES = [scope.value for scope in ConfigScope]


def _json(data: Any) -> web.Response:
    return web.json_response(data, dumps=_dumps)


async def set_config(request: web.Request) -> web.Response:
    """POST /v1/config: create or replace files in one scope."""
    params.query(request, ())
    body = await params.json_object(
        request,
        {"scope": str, "files": dict, "reason": str},
        {"key": str, "unencrypted": bool, "on_changed": list, "factory": str},
    )
    scope = _scope(body["scope"], body.get("key"))
    on_changed = _commands(body.get("on_changed", []))
    files = {
        name: ConfigValue(_value(name, value), on_changed, body.get("unencrypted", False))
        for name, value in body["files"].items()
    }
    done = await config_admin.set_config(
        request.app[STORE],
        scope,
        body.get("key", ""),
        files,
        reason=body["reason"],
        actor=request[CALLER].actor,
        factory=body.get("factory"),
    )
    return _json(done.as_dict())


async def config_log(request: web.Request) -> web.Response:
    """GET /v1/config/log: changes to one scope, newest first."""
    query = params.query(request, ("device", "group", "factory", "limit"))
    changes = await config_admin.config_log(
        request.app[STORE],
        device=query.get("device"),
        group=query.get("group"),
        factory=query.get("factory"),
        limit=params.integer("limit", query.get("limit"), 50, 1, 1000),
    )
    return _json([change.as_dict() for change in changes])


async def move_to_group(request: web.Request) -> web.Response:
    """POST /v1/devices/{uuid}/group {"group": G ("" for none), "reason"}."""
    params.query(request, ())
    body = await params.json_object(request, {"group": str, "reason": str})
    change = await config_admin.move_to_group(
        request.app[STORE],
        request.match_info["uuid"],
        body.get("group"),
        reason=body["reason"],
        actor=request[CALLER].actor,
    )
    return _json({"moved": change is not None, "change": change.as_dict() if change else None})


async def unlock_config(request: web.Request) -> web.Response:
    """POST /v1/devices/{uuid}/unlock {"reason"}: withdraw the device's announced next key."""
    params.query(request, ())
    body = await params.json_object(request, {"reason": str})
    unlocked = await config_admin.unlock_config(
        request.app[STORE],
        request.match_info["uuid"],
        reason=body["reason"],
        actor=request[CALLER].actor,
    )
    return _json(unlocked)


def _scope(name: str, key: str | None) -> ConfigScope:
    if name not in SCOPES:
        raise bad_request(f"scope {name!r} is not one of {', '.join(SCOPES)}")
    scope = ConfigScope(name)
    if (scope == ConfigScope.FACTORY) != (key is None):
        raise bad_request("give 'key' (the group or device uuid) for group and device scope only")
    return scope


def _value(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise bad_request(f"file {name!r}: its value must be a string")
    return value


def _commands(items: list[Any]) -> list[str]:
    if not all(isinstance(item, str) and item for item in items):
        raise bad_request("'on_changed' must be a list of non-empty strings (one argument each)")
    return list(items)


def config_endpoints() -> list[Endpoint]:
    """Every config route."""
    return [
        Endpoint(
            "POST",
            "/v1/config",
            set_config,
            ROTATE,
            "Create or replace config files in one scope; device-scope values are encrypted "
            "to the device's current key, and refused (409) while it changes its key",
            schemas.ref("ConfigSet"),
            body=schemas.ref("ConfigSetRequest"),
            errors=(400, 404, 409, 413),
        ),
        Endpoint(
            "GET",
            "/v1/config/log",
            config_log,
            READ,
            "Changes to the factory-wide files, or a group's (group=G) or a device's "
            "(device=UUID), newest first",
            {"type": "array", "items": schemas.ref("ConfigChange")},
            query=(
                Param("device", "A device's changes"),
                Param("group", "A group's changes"),
                Param("factory", "Factory name; needed only when the store holds several"),
                Param(
                    "limit",
                    "At most this many, 1 to 1000 (default 50)",
                    {"type": "integer", "minimum": 1, "maximum": 1000},
                ),
            ),
            errors=(400, 404),
        ),
        Endpoint(
            "POST",
            "/v1/devices/{uuid}/group",
            move_to_group,
            ROTATE,
            "Move a device to a group (or to none); it fetches its new group's files at its "
            "next check-in",
            schemas.ref("GroupMoved"),
            body=schemas.ref("GroupMoveRequest"),
            errors=(400, 404, 413),
        ),
        Endpoint(
            "POST",
            "/v1/devices/{uuid}/unlock",
            unlock_config,
            ROTATE,
            "Withdraw the next key a device announced, which unlocks its config; for a "
            "rotation that will not finish (its device then rolls back if it goes on)",
            schemas.ref("Unlocked"),
            body=schemas.ref("DenyRequest"),
            errors=(400, 404, 413),
        ),
    ]
